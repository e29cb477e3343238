//! Pieces every upload shares: streaming a body part to a file with a size
//! limit, reading a multipart form, and removing what a failed upload left.

use std::path::{Path as FsPath, PathBuf};

use axum::extract::{FromRequest, Multipart, Request};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{text, AppState};
use crate::api::error::{ApiError, FieldError};

/// Streams chunks into a new file at `path`, refusing more than `limit`
/// bytes. Returns the bytes written.
pub async fn write_upload(
    path: &FsPath,
    mut chunks: impl futures_util::Stream<Item = Result<axum::body::Bytes, ApiError>> + Unpin,
    limit: usize,
) -> Result<u64, ApiError> {
    // Created here, not on a blocking thread: a request dropped mid-create
    // would leave the file after its guard ran.
    let file = std::fs::File::create(path)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut written = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        written += chunk.len() as u64;
        if written > limit as u64 {
            return Err(ApiError::PayloadTooLarge(format!(
                "the upload is larger than the {limit}-byte limit"
            )));
        }
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(written)
}

/// The `file` part of a multipart upload.
pub struct UploadedFile {
    pub filename: Option<String>,
    pub bytes: u64,
}

/// Reads a multipart form: the `file` part is streamed to `path` (at most
/// `limit` bytes), every other part's text goes to `on_field(name, value)`.
pub async fn read_multipart(
    request: Request,
    state: &AppState,
    path: &FsPath,
    limit: usize,
    mut on_field: impl FnMut(&str, &str),
) -> Result<Option<UploadedFile>, ApiError> {
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(ApiError::from)?;
    let mut file = None;
    let mut text_fields = 0;
    while let Some(mut field) = multipart.next_field().await? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            let filename = field.file_name().map(str::to_string);
            if let Some(filename) = &filename {
                check_file_name(filename)?;
            }
            let chunks = (&mut field).map(|chunk| chunk.map_err(ApiError::from));
            let bytes = write_upload(path, chunks, limit).await?;
            file = Some(UploadedFile { filename, bytes });
        } else {
            text_fields += 1;
            if text_fields > MAX_TEXT_FIELDS {
                return Err(ApiError::invalid(
                    "the form is invalid",
                    vec![FieldError::new(
                        "form",
                        format!("more than {MAX_TEXT_FIELDS} text fields; a form needs a handful"),
                    )],
                ));
            }
            let value = read_text_field(&mut field, &name).await?;
            on_field(&name, &value);
        }
    }
    Ok(file)
}

/// Longest text form field (a name, a list of numbers); uploads are large
/// but their other fields are not.
const MAX_FIELD_BYTES: usize = 4096;
/// Text fields a form may carry: each may add an error or a setting, and
/// a large upload's body could otherwise hold millions of tiny ones.
const MAX_TEXT_FIELDS: usize = 64;
/// Longest file name kept (it is stored with the upload).
const MAX_FILE_NAME_BYTES: usize = 255;

fn shown(name: &str) -> String {
    name.chars().filter(|c| *c != '\0').take(64).collect()
}

/// A text field, at most [`MAX_FIELD_BYTES`], UTF-8 without NUL.
async fn read_text_field(
    field: &mut axum::extract::multipart::Field<'_>,
    name: &str,
) -> Result<String, ApiError> {
    let invalid = |reason: String| {
        ApiError::invalid(
            "the form is invalid",
            vec![FieldError::new(shown(name), reason)],
        )
    };
    let mut bytes = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
            return Err(invalid(format!(
                "longer than {MAX_FIELD_BYTES} bytes; only the `file` part may be large"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    let value = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
    text::check_form_text(&shown(name), &value)?;
    Ok(value)
}

fn check_file_name(filename: &str) -> Result<(), ApiError> {
    text::check_form_text("file", filename)?;
    if filename.len() > MAX_FILE_NAME_BYTES {
        return Err(ApiError::invalid(
            "the form is invalid",
            vec![FieldError::new(
                "file",
                format!("the file name is longer than {MAX_FILE_NAME_BYTES} bytes"),
            )],
        ));
    }
    Ok(())
}

/// Removes a file or directory when dropped, unless kept: a failed or
/// abandoned upload leaves nothing behind.
pub struct RemoveOnDrop(pub PathBuf);

impl RemoveOnDrop {
    pub fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            remove_path(&self.0);
        }
    }
}

pub fn remove_path(path: &FsPath) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}
