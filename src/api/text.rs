//! Text a client sends that Postgres cannot store: a NUL character is
//! refused in any text column, so one in a path, query or JSON string would
//! surface as a 500. Refused here, naming where it is, before any handler
//! (or the database) sees it.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::api::error::{ApiError, FieldError};

const WHY: &str = "contains a NUL character, which no name, id or value may hold";

/// Middleware: a NUL (`%00`) in the path names no resource (404); in a
/// query parameter it is an invalid value (422).
pub async fn refuse_nul_in_uri(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let encoded_nul = |s: &str| s.contains("%00");
    if encoded_nul(uri.path()) {
        return ApiError::NotFound(format!("no resource here: the path {WHY}")).into_response();
    }
    if let Some(query) = uri.query().filter(|q| encoded_nul(q)) {
        let errors = query
            .split('&')
            .filter(|pair| encoded_nul(pair))
            .take(10)
            .map(|pair| {
                let name = pair.split('=').next().unwrap_or_default();
                let name: String = name.chars().take(64).collect();
                FieldError::new(format!("query:{name}"), WHY)
            })
            .collect();
        return ApiError::invalid("invalid query parameters", errors).into_response();
    }
    next.run(request).await
}

/// The JSON pointer (`/backbone`, `/augment/0`) of the first string or key
/// holding a NUL, if any.
pub fn nul_in_json(value: &Value) -> Option<String> {
    fn escape(key: &str) -> String {
        key.replace('~', "~0").replace('/', "~1")
    }
    match value {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in_json(item).map(|rest| format!("/{i}{rest}"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(format!("/{}", escape(&key.replace('\0', "\\u0000"))));
            }
            nul_in_json(item).map(|rest| format!("/{}{rest}", escape(key)))
        }),
        _ => None,
    }
}

/// A 422 for a NUL in a JSON body, naming the field.
pub fn nul_in_body(pointer: String) -> ApiError {
    ApiError::invalid(
        "the JSON body does not match the schema",
        vec![FieldError::new(format!("body{pointer}"), WHY)],
    )
}

/// A multipart text field or file name holding a NUL.
pub fn check_form_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::invalid(
            "the form is invalid",
            vec![FieldError::new(field, WHY)],
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_nul_is_found_by_its_json_pointer() {
        assert_eq!(nul_in_json(&json!({"backbone": "resnet18"})), None);
        assert_eq!(
            nul_in_json(&json!({"backbone": "a\u{0}"})).as_deref(),
            Some("/backbone")
        );
        assert_eq!(
            nul_in_json(&json!({"augment": {"ops": ["flip", "x\u{0}"]}})).as_deref(),
            Some("/augment/ops/1")
        );
        assert_eq!(
            nul_in_json(&json!({"a/b\u{0}": 1})).as_deref(),
            Some("/a~1b\\u0000")
        );
    }
}
