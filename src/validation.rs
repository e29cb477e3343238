//! What is wrong with an input, in terms any layer can report: the request
//! validators, the archive ingest and the job configuration all list
//! [`FieldError`]s, and the API renders them as problem details.

use serde::Serialize;

/// One offending input: where it is (a JSON field, a form part, a file in an
/// archive) and what is wrong with it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Most errors one answer lists; the rest are only counted, so that no input
/// makes the answer (or the memory spent collecting it) large.
pub const MAX_LISTED_ERRORS: usize = 100;
