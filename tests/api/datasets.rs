use axum::http::StatusCode;
use image::ImageFormat;

use crate::helpers::{encode, render, shapes_zip, zip, Part, TestApp};

#[tokio::test]
async fn upload_splits_each_class_and_reports_skipped_files() {
    let app = TestApp::spawn().await;
    let mut entries = vec![
        (
            "__MACOSX/disc/._00.png".to_string(),
            b"resource fork".to_vec(),
        ),
        ("disc/.DS_Store".to_string(), b"finder".to_vec()),
        ("disc/notes.txt".to_string(), b"not an image".to_vec()),
        (
            "square/broken.jpg".to_string(),
            b"\xff\xd8\xff\xe0 truncated".to_vec(),
        ),
    ];
    for i in 0..10 {
        entries.push((
            format!("disc/{i}.png"),
            encode(&render(0, i, 40), ImageFormat::Png),
        ));
        entries.push((
            format!("square/{i}.jpg"),
            encode(&render(1, i, 40), ImageFormat::Jpeg),
        ));
    }
    let reply = app.upload_dataset(zip(&entries)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    let id = reply.json["id"].as_str().unwrap().to_string();
    assert_eq!(
        reply.location.as_deref(),
        Some(format!("/datasets/{id}").as_str())
    );
    assert_eq!(reply.json["classes"], serde_json::json!(["disc", "square"]));
    assert_eq!(reply.json["counts"]["train"]["disc"], 8);
    assert_eq!(reply.json["counts"]["val"]["square"], 2);
    assert_eq!(reply.json["num_train"], 16);
    assert_eq!(reply.json["num_val"], 4);
    let skipped: Vec<String> = reply.json["report"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped.contains(&"disc/notes.txt".to_string()));
    assert!(skipped.contains(&"square/broken.jpg".to_string()));

    let fetched = app.get(&format!("/datasets/{id}")).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.json["id"], id);
    assert_eq!(app.get("/datasets").await.json.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn train_and_val_folders_are_kept_and_a_wrapper_folder_is_ignored() {
    let app = TestApp::spawn().await;
    let mut entries = Vec::new();
    for (split, n) in [("train", 4), ("val", 2)] {
        for (c, class) in ["disc", "square"].iter().enumerate() {
            for i in 0..n {
                let image = encode(&render(c, i + 100 * n, 32), ImageFormat::Png);
                entries.push((format!("flowers/{split}/{class}/{i}.png"), image));
            }
        }
    }
    let reply = app.upload_dataset(zip(&entries)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(reply.json["classes"], serde_json::json!(["disc", "square"]));
    assert_eq!(reply.json["num_train"], 8);
    assert_eq!(reply.json["num_val"], 4);
}

#[tokio::test]
async fn bad_uploads_get_problems_and_store_nothing() {
    let app = TestApp::spawn().await;

    let not_zip = app
        .post_multipart(
            "/datasets",
            &[Part::file(
                "file",
                "flowers.zip",
                b"this is not a zip".to_vec(),
            )],
        )
        .await;
    let errors = not_zip.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file");

    let one_class = app
        .upload_dataset(zip(&(0..4)
            .map(|i| {
                (
                    format!("disc/{i}.png"),
                    encode(&render(0, i, 32), ImageFormat::Png),
                )
            })
            .collect::<Vec<_>>()))
        .await;
    let errors = one_class.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        errors[0]["reason"].as_str().unwrap().contains("at least 2"),
        "{errors:?}"
    );

    let tiny_class = app
        .upload_dataset(zip(&[
            (
                "disc/0.png".to_string(),
                encode(&render(0, 0, 32), ImageFormat::Png),
            ),
            (
                "disc/1.png".to_string(),
                encode(&render(0, 1, 32), ImageFormat::Png),
            ),
            (
                "disc/2.png".to_string(),
                encode(&render(0, 2, 32), ImageFormat::Png),
            ),
            (
                "square/0.png".to_string(),
                encode(&render(1, 0, 32), ImageFormat::Png),
            ),
        ]))
        .await;
    let errors = tiny_class.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "class:square");

    let escaping = app
        .upload_dataset(zip(&[(
            "../evil/0.png".to_string(),
            encode(&render(0, 0, 32), ImageFormat::Png),
        )]))
        .await;
    let errors = escaping.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert!(errors[0]["path"]
        .as_str()
        .unwrap()
        .contains("../evil/0.png"));

    // An archive bomb: 20 MB of zeros posing as a photo deflates a
    // thousandfold; it is refused from the zip's headers, before inflating.
    let bomb = app
        .upload_dataset(zip(&[
            ("disc/bomb.png".to_string(), vec![0u8; 20 << 20]),
            (
                "square/0.png".to_string(),
                encode(&render(1, 0, 32), ImageFormat::Png),
            ),
        ]))
        .await;
    let errors = bomb.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file:disc/bomb.png");
    assert!(errors[0]["reason"]
        .as_str()
        .unwrap()
        .contains("archive bomb"));

    let no_file = app
        .post_multipart("/datasets", &[Part::text("name", "flowers")])
        .await;
    no_file.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);

    let bad_fraction = app
        .post_multipart(
            "/datasets",
            &[
                Part::text("val_fraction", "0.9"),
                Part::file("file", "shapes.zip", shapes_zip(4, 32)),
            ],
        )
        .await;
    let errors = bad_fraction.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "val_fraction");

    app.assert_no_dataset_stored().await;
}

#[tokio::test]
async fn unknown_dataset_ids_are_not_found() {
    let app = TestApp::spawn().await;
    app.get(&format!("/datasets/{}", uuid::Uuid::new_v4()))
        .await
        .assert_problem(StatusCode::NOT_FOUND);
    app.get("/datasets/not-a-uuid")
        .await
        .assert_problem(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deleting_a_dataset_removes_its_files_but_not_what_refers_to_it() {
    let app = TestApp::spawn().await;
    let delete = |id: &str| {
        axum::http::Request::delete(format!("/datasets/{id}"))
            .body(axum::body::Body::empty())
            .unwrap()
    };

    // Unused: row and files go.
    let unused = app.shapes_dataset(4, 32).await;
    assert_eq!(
        app.send(delete(&unused)).await.status,
        StatusCode::NO_CONTENT
    );
    app.get(&format!("/datasets/{unused}"))
        .await
        .assert_problem(StatusCode::NOT_FOUND);
    assert!(app.files_under(&format!("datasets/{unused}")).is_empty());
    app.send(delete(&unused))
        .await
        .assert_problem(StatusCode::NOT_FOUND);

    // In use by a queued job: refused, nothing touched.
    let used = app.shapes_dataset(4, 32).await;
    let job = app
        .submit_job(serde_json::json!({ "dataset_id": used, "epochs": 1 }))
        .await;
    let refused = app.send(delete(&used)).await;
    refused.assert_problem(StatusCode::CONFLICT);
    assert!(refused.json["detail"].as_str().unwrap().contains(&job));
    assert!(!app.files_under(&format!("datasets/{used}")).is_empty());

    // Once the job has ended the files go, and the row stays for lineage.
    app.post_empty(&format!("/jobs/{job}/cancel")).await;
    assert_eq!(app.send(delete(&used)).await.status, StatusCode::NO_CONTENT);
    assert!(app.files_under(&format!("datasets/{used}")).is_empty());
    assert_eq!(
        app.get(&format!("/datasets/{used}")).await.json["status"],
        "deleted"
    );
    let listed = app.get("/datasets").await;
    assert!(
        listed.json.as_array().unwrap().is_empty(),
        "{:?}",
        listed.json
    );
    let errors = app
        .post_json("/jobs", &serde_json::json!({ "dataset_id": used }))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "dataset_id");
}

/// A tar of (path, bytes) entries; paths are written as given, unchecked.
fn tar(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

fn shapes_entries(per_class: u64, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut entries = Vec::new();
    for (c, name) in crate::helpers::SHAPES.iter().enumerate() {
        for i in 0..per_class {
            entries.push((
                format!("{prefix}{name}/{i}.png"),
                encode(&render(c, i, 32), ImageFormat::Png),
            ));
        }
    }
    entries
}

#[tokio::test]
async fn tar_and_tar_gz_archives_are_read_by_their_content() {
    let app = TestApp::spawn().await;
    // A plain tar, wrapped in a folder, under a misleading name.
    let plain = tar(&shapes_entries(4, "photos/"));
    let reply = app
        .post_multipart("/datasets", &[Part::file("file", "shapes.zip", plain)])
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(
        reply.json["classes"],
        serde_json::json!(crate::helpers::SHAPES)
    );
    assert_eq!(
        reply.json["num_train"].as_i64().unwrap() + reply.json["num_val"].as_i64().unwrap(),
        12
    );

    // tar.gz
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar(&shapes_entries(4, ""))).unwrap();
    let reply = app
        .post_multipart(
            "/datasets",
            &[Part::file("file", "shapes.tgz", gz.finish().unwrap())],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);

    // A path escaping the archive is refused, and nothing is stored.
    let mut evil = shapes_entries(2, "");
    evil.push((
        "../evil/0.png".to_string(),
        encode(&render(0, 9, 32), ImageFormat::Png),
    ));
    let before = app.count("datasets").await;
    let errors = app
        .post_multipart("/datasets", &[Part::file("file", "evil.tar", tar(&evil))])
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "file:../evil/0.png");
    assert_eq!(app.count("datasets").await, before);
    assert!(app.files_under("tmp").is_empty());
}

#[tokio::test]
async fn an_archive_can_be_the_raw_body_with_settings_as_query_parameters() {
    let app = TestApp::spawn_custom(crate::helpers::small_batching(), |state| {
        state.limits.max_upload_bytes = 2 * 1024 * 1024;
    })
    .await;
    let reply = app
        .post_bytes(
            "/datasets?name=raw&val_fraction=0.25&seed=3",
            "application/zip",
            shapes_zip(4, 32),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    assert_eq!(reply.json["name"], "raw");
    assert_eq!(reply.json["num_val"], 3, "one of four per class held out");

    let errors = app
        .post_bytes(
            "/datasets?val_fraction=2",
            "application/zip",
            shapes_zip(4, 32),
        )
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(errors[0]["path"], "val_fraction");
    app.post_bytes("/datasets", "text/plain", b"hello".to_vec())
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Over the upload limit: refused while streaming, nothing kept.
    app.post_bytes("/datasets", "application/zip", vec![0u8; 3 * 1024 * 1024])
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.count("datasets").await, 1);
    assert!(app.files_under("tmp").is_empty());
}

#[tokio::test]
async fn identical_images_are_listed_and_train_val_leakage_reported() {
    let app = TestApp::spawn().await;
    let png = |shape: usize, seed: u64| encode(&render(shape, seed, 32), ImageFormat::Png);
    let mut entries = Vec::new();
    for (c, name) in crate::helpers::SHAPES.iter().enumerate() {
        for i in 0..3 {
            entries.push((format!("train/{name}/{i}.png"), png(c, i)));
        }
        entries.push((format!("val/{name}/v.png"), png(c, 10)));
    }
    // The same photo in train and in val, and twice within train.
    entries.push(("val/disc/copy.png".to_string(), png(0, 1)));
    entries.push(("train/square/again.png".to_string(), png(1, 2)));
    let reply = app.upload_dataset(zip(&entries)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.json);
    let report = &reply.json["report"];
    assert_eq!(
        report["duplicates"],
        serde_json::json!([
            ["train/disc/1.png", "val/disc/copy.png"],
            ["train/square/2.png", "train/square/again.png"]
        ])
    );
    assert_eq!(
        report["leakage"],
        serde_json::json!([["train/disc/1.png", "val/disc/copy.png"]])
    );
    // The same report later.
    let id = reply.json["id"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/datasets/{id}")).await.json["report"],
        *report
    );
}
