//! The `#[idempotent]` attribute of idem. Use it through the `idem` crate:
//! `use idem::idempotent;`.

use proc_macro::TokenStream;

/// Marks an async function as an idempotent JetStream message handler.
///
/// Not implemented yet: the attribute currently rejects every use with a
/// compile error, so that nothing silently runs without its guarantees.
#[proc_macro_attribute]
pub fn idempotent(_args: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let error = syn::Error::new_spanned(
        &item,
        "#[idempotent] is not implemented in this version of idem yet",
    );
    let mut out = error.to_compile_error();
    out.extend(item);
    out.into()
}
