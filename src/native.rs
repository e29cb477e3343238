//! Safe wrappers over `src/native/shim.cpp`: what libtorch can do and tch
//! does not expose.

use std::ffi::{c_char, CStr};

extern "C" {
    fn ft_free_message(text: *mut c_char);
    fn ft_script_operations(
        data: *const c_char,
        length: usize,
        listing: *mut *mut c_char,
    ) -> *mut c_char;
    fn ft_script_add_features(
        data: *const c_char,
        length: usize,
        method: *const c_char,
        strip_linear: bool,
        removed: *mut *mut c_char,
        out: *mut *mut c_char,
        out_length: *mut usize,
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

/// One operation found in a TorchScript module's code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptOperation {
    /// `aten::conv2d`, `prim::If`, …
    pub kind: String,
    /// The function it is in (`__torch__.torchvision.models.resnet.ResNet.forward`).
    pub function: String,
    /// `file:line` of the source it came from, when the module kept it.
    pub location: String,
}

/// Every operation kind used by every function of the serialized module
/// (once per function), after inlining: what running any of them may do.
/// Loading runs the module's `__setstate__` methods: call it only where
/// that is contained (the upload check's child process).
pub fn script_operations(module: &[u8]) -> Result<Vec<ScriptOperation>, String> {
    let mut listing: *mut c_char = std::ptr::null_mut();
    // SAFETY: a valid buffer and out-pointer for the duration of the call.
    let error = unsafe { ft_script_operations(module.as_ptr().cast(), module.len(), &mut listing) };
    if let Some(error) = take_message(error) {
        return Err(error);
    }
    let listing = take_message(listing).unwrap_or_default();
    Ok(listing
        .lines()
        .map(|line| {
            let mut fields = line.splitn(3, '\t');
            let mut next = || fields.next().unwrap_or_default().to_string();
            ScriptOperation {
                kind: next(),
                function: next(),
                location: next(),
            }
        })
        .collect())
}

/// The serialized TorchScript `module` with one more method, `method`: its
/// `forward` without the final linear layer (when `strip_linear`), else
/// `forward` itself. Returns the new module's bytes and the removed layer's
/// weight (`fc.weight`), if one was removed.
pub fn add_features_method(
    module: &[u8],
    method: &str,
    strip_linear: bool,
) -> Result<(Vec<u8>, Option<String>), String> {
    let method = std::ffi::CString::new(method).map_err(|e| e.to_string())?;
    let mut removed: *mut c_char = std::ptr::null_mut();
    let mut out: *mut c_char = std::ptr::null_mut();
    let mut out_length = 0usize;
    // SAFETY: a valid buffer and out-pointers for the duration of the call.
    let error = unsafe {
        ft_script_add_features(
            module.as_ptr().cast(),
            module.len(),
            method.as_ptr(),
            strip_linear,
            &mut removed,
            &mut out,
            &mut out_length,
        )
    };
    if let Some(error) = take_message(error) {
        return Err(error);
    }
    let bytes = if out.is_null() {
        Vec::new()
    } else {
        // SAFETY: the shim allocated `out_length` bytes with malloc.
        let bytes = unsafe { std::slice::from_raw_parts(out.cast::<u8>(), out_length) }.to_vec();
        // SAFETY: freed once, by the allocator that made it.
        unsafe { ft_free_message(out) };
        bytes
    };
    Ok((bytes, take_message(removed)))
}

/// Makes autocast on CUDA compute in bf16 (libtorch's default is fp16), for
/// the calling thread.
pub fn autocast_cuda_bf16() {
    // SAFETY: sets a thread-local dtype; no pointers involved.
    unsafe { ft_autocast_cuda_bf16() }
}
