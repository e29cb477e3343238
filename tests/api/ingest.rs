//! Ingest of real-world archives: every image format and colour type,
//! every layout, every bad input named, progress, samples.

use std::io::Cursor;

use axum::http::StatusCode;
use finetuned::data::preprocess;
use image::{DynamicImage, GrayImage, ImageFormat};
use serde_json::{json, Value};

use crate::fashion::{fashion_mnist, FASHION_CLASSES};
use crate::helpers::{encode, render, shapes_zip, zip, Part, TestApp};

const TROUSER: usize = 1;
const BAG: usize = 8;

/// One photo in every encoding and colour type users' tools produce.
fn encodings(photo: &GrayImage) -> Vec<(&'static str, Vec<u8>)> {
    // Larger than the stored size, and in colour, like a real upload.
    let big = image::imageops::resize(photo, 300, 300, image::imageops::FilterType::Triangle);
    let rgb = DynamicImage::ImageLuma8(big.clone()).into_rgb8();
    let write = |image: DynamicImage, format: ImageFormat| {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encodes");
        out.into_inner()
    };
    vec![
        (
            "gray.jpg",
            write(DynamicImage::ImageLuma8(big.clone()), ImageFormat::Jpeg),
        ),
        ("rgb.jpg", encode(&rgb, ImageFormat::Jpeg)),
        ("cmyk.jpg", cmyk_jpeg(&rgb)),
        (
            "gray.png",
            write(DynamicImage::ImageLuma8(big.clone()), ImageFormat::Png),
        ),
        (
            "rgba.png",
            write(
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).into_rgba8()),
                ImageFormat::Png,
            ),
        ),
        (
            "deep.png",
            write(
                DynamicImage::ImageRgb16(DynamicImage::ImageRgb8(rgb.clone()).into_rgb16()),
                ImageFormat::Png,
            ),
        ),
        ("palette.png", palette_png(&big)),
        (
            "lossless.webp",
            write(
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).into_rgba8()),
                ImageFormat::WebP,
            ),
        ),
        ("plain.bmp", encode(&rgb, ImageFormat::Bmp)),
        (
            "first-frame.gif",
            write(
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).into_rgba8()),
                ImageFormat::Gif,
            ),
        ),
        ("scan.tiff", encode(&rgb, ImageFormat::Tiff)),
    ]
}

/// A CMYK JPEG, as print workflows and some scanners write.
fn cmyk_jpeg(rgb: &image::RgbImage) -> Vec<u8> {
    let cmyk: Vec<u8> = rgb
        .pixels()
        .flat_map(|p| {
            let [r, g, b] = p.0.map(|c| c as f32 / 255.0);
            let k = 1.0 - r.max(g).max(b);
            let part = |c: f32| {
                if k >= 1.0 {
                    0.0
                } else {
                    (1.0 - c - k) / (1.0 - k)
                }
            };
            [part(r), part(g), part(b), k].map(|v| (v * 255.0).round() as u8)
        })
        .collect();
    let mut out = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut out, 95);
    encoder
        .encode(
            &cmyk,
            rgb.width() as u16,
            rgb.height() as u16,
            jpeg_encoder::ColorType::Cmyk,
        )
        .expect("CMYK JPEG");
    out
}

/// An indexed-colour PNG (16 gray levels).
fn palette_png(gray: &GrayImage) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, gray.width(), gray.height());
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette((0..16u8).flat_map(|i| [i * 17; 3]).collect::<Vec<u8>>());
        let mut writer = encoder.write_header().expect("png header");
        let indices: Vec<u8> = gray.pixels().map(|p| p.0[0] / 16).collect();
        writer.write_image_data(&indices).expect("png data");
    }
    out
}

/// A PNG whose header claims 30000×30000 pixels (a decompression bomb):
/// it must be refused from the header, before any pixel is inflated.
fn huge_png_header() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&30_000u32.to_be_bytes());
    ihdr.extend_from_slice(&30_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray
    let mut idat = b"IDAT".to_vec();
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut zlib, &vec![0u8; 100_000]).unwrap();
    idat.extend_from_slice(&zlib.finish().unwrap());
    for chunk in [ihdr, idat, b"IEND".to_vec()] {
        png.extend_from_slice(&(chunk.len() as u32 - 4).to_be_bytes());
        png.extend_from_slice(&chunk);
        let mut crc = flate2::Crc::new();
        crc.update(&chunk);
        png.extend_from_slice(&crc.sum().to_be_bytes());
    }
    png
}

fn fashion_entries(prefix: &str, per_class: usize) -> Vec<(String, Vec<u8>)> {
    fashion_mnist(&[TROUSER, BAG], per_class)
        .into_iter()
        .enumerate()
        .map(|(i, (label, photo))| {
            let path = format!("{prefix}{}/{i:03}.png", FASHION_CLASSES[label]);
            (
                path,
                encode(
                    &DynamicImage::ImageLuma8(photo).into_rgb8(),
                    ImageFormat::Png,
                ),
            )
        })
        .collect()
}

fn skipped_paths(reply: &Value) -> Vec<String> {
    reply["report"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_format_and_colour_type_becomes_the_same_rgb_photo() {
    let app = TestApp::spawn().await;
    let photos = fashion_mnist(&[TROUSER, BAG], 2);
    let mut entries = Vec::new();
    for (i, (label, photo)) in photos.iter().enumerate() {
        for (name, bytes) in encodings(photo) {
            entries.push((format!("{}/{i}-{name}", FASHION_CLASSES[*label]), bytes));
        }
    }
    let total = entries.len();
    let reply = app.upload_dataset(zip(&entries)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(reply.json["classes"], json!(["bag", "trouser"]));
    assert_eq!(skipped_paths(&reply.json), Vec::<String>::new());
    let stored =
        reply.json["num_train"].as_i64().unwrap() + reply.json["num_val"].as_i64().unwrap();
    assert_eq!(stored as usize, total);

    // Each encoding decodes to the plain RGB rendering, up to lossy coding.
    let reference = preprocess::decode_canonical(&encodings(&photos[0].1)[1].1).unwrap();
    for (name, bytes) in encodings(&photos[0].1) {
        let canonical = preprocess::decode_canonical(&bytes).unwrap();
        let mean_diff = canonical
            .iter()
            .zip(&reference)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / reference.len() as f64;
        let limit = if name == "palette.png" { 10.0 } else { 4.0 };
        assert!(
            mean_diff < limit,
            "{name}: mean |difference| {mean_diff:.2}"
        );
    }
}

#[tokio::test]
async fn every_layout_is_recognised() {
    let app = TestApp::spawn().await;
    let upload = |entries: Vec<(String, Vec<u8>)>, fields: Vec<(&'static str, &'static str)>| {
        let app = &app;
        async move {
            let mut parts: Vec<Part> = fields.iter().map(|(k, v)| Part::text(k, v)).collect();
            parts.push(Part::file("file", "clothes.zip", zip(&entries)));
            let reply = app.post_multipart("/datasets", &parts).await;
            assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
            reply.json
        }
    };
    let counts =
        |reply: &Value| ["num_train", "num_val", "num_test"].map(|k| reply[k].as_i64().unwrap());

    // Class folders, with a test share held out besides validation.
    let reply = upload(fashion_entries("", 10), vec![("test_fraction", "0.2")]).await;
    assert_eq!(counts(&reply), [12, 4, 4]);
    assert_eq!(reply["counts"]["test"]["bag"], 2);

    // train/ + validation/ + test/ inside a wrapper folder; and valid/.
    let mut entries = fashion_entries("clothes/train/", 6);
    entries.extend(fashion_entries("clothes/validation/", 2));
    entries.extend(fashion_entries("clothes/test/", 3));
    assert_eq!(counts(&upload(entries, vec![]).await), [12, 4, 6]);
    let mut entries = fashion_entries("train/", 5);
    entries.extend(fashion_entries("valid/", 1));
    assert_eq!(counts(&upload(entries, vec![]).await), [10, 2, 0]);

    // A labels.csv manifest: flat images, labels and some splits given, one
    // image left unlisted.
    let images: Vec<(String, Vec<u8>)> = fashion_entries("", 6)
        .into_iter()
        .enumerate()
        .map(|(i, (_, bytes))| (format!("export/images/img{i:02}.png"), bytes))
        .collect();
    let mut csv = String::from("path,label,split\n");
    let labels = fashion_mnist(&[TROUSER, BAG], 6);
    for (i, (label, _)) in labels.iter().enumerate().take(11) {
        let split = if i < 2 { "test" } else { "" };
        csv.push_str(&format!(
            "images/img{i:02}.png,{},{split}\n",
            FASHION_CLASSES[*label]
        ));
    }
    let mut entries = images;
    entries.push(("export/labels.csv".to_string(), csv.into_bytes()));
    let reply = upload(entries, vec![]).await;
    assert_eq!(reply["classes"], json!(["bag", "trouser"]));
    assert_eq!(counts(&reply)[2], 2, "{reply:?}");
    assert_eq!(counts(&reply).iter().sum::<i64>(), 11);
    assert_eq!(skipped_paths(&reply), vec!["images/img11.png".to_string()]);
}

#[tokio::test]
async fn each_bad_input_names_the_file_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let post = |fields: Vec<(&'static str, &'static str)>, entries: Vec<(String, Vec<u8>)>| {
        let app = &app;
        async move {
            let mut parts: Vec<Part> = fields.iter().map(|(k, v)| Part::text(k, v)).collect();
            parts.push(Part::file("file", "clothes.zip", zip(&entries)));
            app.post_multipart("/datasets", &parts).await
        }
    };
    let first_error = |reply: crate::helpers::Reply| {
        let errors = reply.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
        (
            errors[0]["path"].as_str().unwrap().to_string(),
            errors[0]["reason"].as_str().unwrap().to_string(),
        )
    };
    let broken = || {
        (
            "bag/broken.jpg".to_string(),
            b"\xff\xd8\xff\xe0 truncated".to_vec(),
        )
    };

    // A corrupt image is skipped and reported...
    let mut entries = fashion_entries("", 4);
    entries.push(broken());
    entries.push(("trouser/bomb.png".to_string(), huge_png_header()));
    let reply = post(vec![], entries.clone()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    let skipped = reply.json["report"]["skipped"].as_array().unwrap().clone();
    assert_eq!(skipped[0]["path"], "bag/broken.jpg");
    assert_eq!(skipped[1]["path"], "trouser/bomb.png");
    assert!(
        skipped[1]["reason"]
            .as_str()
            .unwrap()
            .contains("pixel limit"),
        "{skipped:?}"
    );
    app.send(
        axum::http::Request::delete(format!("/datasets/{}", reply.json["id"].as_str().unwrap()))
            .body(axum::body::Body::empty())
            .unwrap(),
    )
    .await;
    // ...or rejects the upload when strict.
    let (path, reason) = first_error(post(vec![("strict", "true")], entries).await);
    assert_eq!(path, "file:bag/broken.jpg");
    assert!(reason.contains("cannot decode"), "{reason}");

    // Too few training images for a configured minimum.
    let (path, reason) =
        first_error(post(vec![("min_per_class", "6")], fashion_entries("", 5)).await);
    assert_eq!(path, "class:bag");
    assert!(reason.contains("at least 6"), "{reason}");

    // A test class that train lacks.
    let mut entries = fashion_entries("train/", 4);
    entries.extend(fashion_entries("val/", 1));
    entries.push((
        "test/hat/0.png".to_string(),
        encode(&render(0, 0, 32), ImageFormat::Png),
    ));
    let (path, reason) = first_error(post(vec![], entries).await);
    assert_eq!(path, "class:hat");
    assert!(reason.contains("test"), "{reason}");

    // An empty archive, and one with only non-images.
    let (path, _) = first_error(post(vec![], vec![]).await);
    assert_eq!(path, "file");
    let (path, _) = first_error(post(vec![], vec![("readme.txt".into(), b"hi".to_vec())]).await);
    assert_eq!(path, "file");

    // A manifest naming a file the archive lacks, and a bad split.
    let mut entries = fashion_entries("", 3);
    let manifest = format!(
        "{},x\ntrouser/missing.png,trouser\n{},y,holdout\n",
        entries[0].0, entries[1].0
    );
    entries.push(("labels.csv".to_string(), manifest.into_bytes()));
    let errors = post(vec![], entries)
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "labels.csv:2");
    assert!(errors[0]["reason"]
        .as_str()
        .unwrap()
        .contains("trouser/missing.png"));
    assert_eq!(errors[1]["path"], "labels.csv:3");

    // Settings out of range, or together leaving too little to train on.
    let (path, _) = first_error(post(vec![("test_fraction", "0.6")], fashion_entries("", 4)).await);
    assert_eq!(path, "test_fraction");
    let (path, reason) = first_error(
        post(
            vec![("val_fraction", "0.5"), ("test_fraction", "0.4")],
            fashion_entries("", 4),
        )
        .await,
    );
    assert_eq!(path, "test_fraction");
    assert!(reason.contains("20%"), "{reason}");
    let (path, _) = first_error(post(vec![("strict", "maybe")], fashion_entries("", 4)).await);
    assert_eq!(path, "strict");

    app.assert_no_dataset_stored().await;
}

#[tokio::test]
async fn an_ingest_shows_its_progress_and_a_dead_one_is_swept() {
    let app = TestApp::spawn().await;
    let archive = shapes_zip(150, 200);
    let poller = async {
        let mut seen = Vec::new();
        for _ in 0..2000 {
            let listed = app.get("/datasets").await.json;
            if let Some(row) = listed.as_array().and_then(|rows| rows.first()) {
                if row["status"] == "ready" {
                    break;
                }
                seen.push(row.clone());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        seen
    };
    let (reply, seen) = tokio::join!(app.upload_dataset(archive), poller);
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert!(!seen.is_empty(), "the dataset was never seen ingesting");
    for row in &seen {
        assert_eq!(row["status"], "ingesting");
        assert!(row["progress"]["stage"].is_string(), "{row:?}");
    }
    assert!(reply.json["progress"].is_null());

    // A job cannot use a dataset that is not ready.
    let id = uuid::Uuid::new_v4();
    finetuned::store::datasets::insert_ingesting(&app.pool, id, "half", 10, 256, "datasets/x")
        .await
        .unwrap();
    let refused = app.post_json("/jobs", &json!({ "dataset_id": id })).await;
    let errors = refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        errors[0]["reason"].as_str().unwrap().contains("ingesting"),
        "{errors:?}"
    );

    // An ingest whose heartbeat stopped (its process died) is removed; a
    // live one is not.
    sqlx::query("UPDATE datasets SET updated_at = now() - interval '1 minute' WHERE id = $1")
        .bind(id)
        .execute(&app.pool)
        .await
        .unwrap();
    let live = uuid::Uuid::new_v4();
    finetuned::store::datasets::insert_ingesting(&app.pool, live, "live", 10, 256, "datasets/y")
        .await
        .unwrap();
    let swept = finetuned::store::datasets::discard_stalled_ingests(&app.pool, 30.0)
        .await
        .unwrap();
    assert_eq!(swept, vec![id]);
}

#[tokio::test]
async fn samples_take_each_class_in_turn_with_thumbnails() {
    let app = TestApp::spawn().await;
    let id = app.shapes_dataset(6, 64).await;
    let reply = app.get(&format!("/datasets/{id}/samples?limit=4")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    let items = reply.json["items"].as_array().unwrap();
    let classes: Vec<&str> = items.iter().map(|i| i["class"].as_str().unwrap()).collect();
    assert_eq!(classes, ["disc", "square", "stripes", "disc"]);
    for item in items {
        let path = item["path"].as_str().unwrap();
        assert!(path.starts_with(item["class"].as_str().unwrap()), "{path}");
        let data = item["thumbnail"].as_str().unwrap();
        let png = data
            .strip_prefix("data:image/png;base64,")
            .expect("a PNG data URL");
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png)
            .unwrap();
        let thumbnail = image::load_from_memory(&bytes).unwrap();
        assert_eq!((thumbnail.width(), thumbnail.height()), (96, 96));
    }

    let only = app
        .get(&format!("/datasets/{id}/samples?class=square&split=val"))
        .await;
    let items = only.json["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(items
        .iter()
        .all(|i| i["class"] == "square" && i["split"] == "val"));

    let bad = app
        .get(&format!("/datasets/{id}/samples?class=hexagon&limit=0"))
        .await;
    let errors = bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    let paths: Vec<&str> = errors.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["limit", "class"]);
    let missing = app
        .get(&format!("/datasets/{}/samples", uuid::Uuid::new_v4()))
        .await;
    missing.assert_problem(StatusCode::NOT_FOUND);
}
