"""Sends every operation of openapi.yaml the strings Postgres cannot store
(a NUL character) and over-long ones, in each path parameter, query
parameter, JSON string property and multipart text field, to a live server.
Fails on any 5xx, and on any 4xx that is not problem+json or is larger than
64 KiB. Schemathesis' generated strings rarely reach these (its path ids are
pinned to seeded resources, and most of its strings are short and valid).

Usage: python hostile_strings.py BASE_URL [openapi.yaml]
"""

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import yaml

BASE = sys.argv[1].rstrip("/")
SPEC = yaml.safe_load(open(sys.argv[2] if len(sys.argv) > 2 else "openapi.yaml"))
HOSTILE = ["a\x00b", "\x00", "x" * 10_000]
MAX_ANSWER = 64 * 1024
failures = []


def resolve(schema):
    while isinstance(schema, dict) and "$ref" in schema:
        node = SPEC
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema or {}


def send(method, path, query=None, body=None, content_type=None, what=""):
    url = BASE + path + ("?" + urllib.parse.urlencode(query) if query else "")
    request = urllib.request.Request(url, data=body, method=method.upper())
    if content_type:
        request.add_header("content-type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, headers, answer = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, answer = err.code, err.headers, err.read()
    kind = headers.get("content-type", "")
    label = f"{method.upper()} {path} ({what})"
    if status >= 500:
        failures.append(f"{label}: {status} {answer[:200]!r}")
    elif status >= 400 and (kind != "application/problem+json" or len(answer) > MAX_ANSWER):
        failures.append(f"{label}: {status} {kind} {len(answer)} bytes")


def fill_path(template, value):
    out = template
    for name in [p[1:-1] for p in template.split("/") if p.startswith("{")]:
        out = out.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
    return out


def multipart(fields):
    boundary = uuid.uuid4().hex
    body = b""
    for name, value in fields.items():
        body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
        body += value.encode() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


requests = 0
for path, item in SPEC["paths"].items():
    for method, op in item.items():
        if method not in ("get", "post", "delete", "put", "patch"):
            continue
        params = [resolve(p) for p in op.get("parameters", []) + item.get("parameters", [])]
        benign = str(uuid.uuid4())
        for value in HOSTILE:
            if "{" in path:
                send(method, fill_path(path, value), what="path")
                requests += 1
            for p in (p for p in params if p.get("in") == "query"):
                send(method, fill_path(path, benign), {p["name"]: value}, what=f"query {p['name']}")
                requests += 1
            content = resolve(op.get("requestBody", {})).get("content", {})
            for media, spec in content.items():
                props = resolve(spec.get("schema", {})).get("properties", {})
                strings = [k for k, s in props.items() if resolve(s).get("type") in ("string", None)]
                for name in strings:
                    if media == "application/json":
                        body = json.dumps({name: value}).encode()
                        send(method, fill_path(path, benign), body=body, content_type=media, what=f"json {name}")
                    elif media == "multipart/form-data" and name not in ("file", "image"):
                        body, kind = multipart({name: value})
                        send(method, fill_path(path, benign), body=body, content_type=kind, what=f"form {name}")
                    else:
                        continue
                    requests += 1

print(f"hostile strings: {requests} requests, {len(failures)} failures")
for failure in failures:
    print("  " + failure)
sys.exit(1 if failures else 0)
