//! Safe wrappers over `src/native/shim.cpp`: what libtorch can do and tch
//! does not expose.

use std::ffi::{c_char, CStr, CString};
use std::path::Path;

extern "C" {
    fn ft_free_message(text: *mut c_char);
    fn ft_script_add_features(
        in_path: *const c_char,
        out_path: *const c_char,
        strip_linear: bool,
        removed: *mut *mut c_char,
    ) -> *mut c_char;
    fn ft_autocast_cuda_bf16();
}

/// Takes ownership of a message from the shim.
fn take_message(text: *mut c_char) -> Option<String> {
    if text.is_null() {
        return None;
    }
    // SAFETY: the shim returns a NUL-terminated string from `strdup`.
    let owned = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { ft_free_message(text) };
    Some(owned)
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))
}

/// Copies the TorchScript module at `input` to `output` with one more
/// method, `features`: its `forward` without the final linear layer (when
/// `strip_linear`), else `forward` itself. Returns the removed layer's
/// weight (`fc.weight`), if one was removed.
pub fn add_features_method(
    input: &Path,
    output: &Path,
    strip_linear: bool,
) -> Result<Option<String>, String> {
    let (input, output) = (c_path(input)?, c_path(output)?);
    let mut removed: *mut c_char = std::ptr::null_mut();
    // SAFETY: valid C strings and out-pointer for the duration of the call.
    let error = unsafe {
        ft_script_add_features(input.as_ptr(), output.as_ptr(), strip_linear, &mut removed)
    };
    match take_message(error) {
        Some(error) => Err(error),
        None => Ok(take_message(removed)),
    }
}

/// Makes autocast on CUDA compute in bf16 (libtorch's default is fp16), for
/// the calling thread.
pub fn autocast_cuda_bf16() {
    // SAFETY: sets a thread-local dtype; no pointers involved.
    unsafe { ft_autocast_cuda_bf16() }
}
