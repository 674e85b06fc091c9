//! Collecting every error, so that one compile reports them all.

use proc_macro2::{Span, TokenStream};

/// The errors found so far.
#[derive(Default)]
pub struct Errors(Vec<syn::Error>);

impl Errors {
    pub fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.0.push(syn::Error::new(span, message));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// All errors as one `syn::Error` (each keeps its own span).
    pub fn combined(self) -> Option<syn::Error> {
        self.0.into_iter().reduce(|mut all, next| {
            all.combine(next);
            all
        })
    }

    pub fn into_compile_errors(self) -> TokenStream {
        self.combined()
            .map(|e| e.to_compile_error())
            .unwrap_or_default()
    }

    #[cfg(test)]
    pub fn messages(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}
