//! Checks across options and the function, after each was parsed on its own.

use std::collections::BTreeSet;

use proc_macro2::Span;
use syn::visit::Visit;
use syn::{Expr, Path};

use crate::errors::Errors;
use crate::options::{DedupMode, Fingerprint, Key, Options};
use crate::signature::{Signature, TRANSACTION_EXTRACTOR};

/// Runs every cross-check; returns the resolved key source.
pub fn validate(options: &Options, sig: &Signature, errors: &mut Errors) -> Option<Key> {
    let dedup = options.dedup.as_ref().map_or(DedupMode::Kv, |d| d.value);
    served(options, errors);
    if let Some(hook) = &options.on_duplicate
        && (dedup == DedupMode::Off || !options.store_result.as_ref().is_some_and(|s| s.value))
    {
        errors.push(
            hook.name.span(),
            "`on_duplicate` hands a duplicate the result its key completed with: add `store_result` (and keep dedup on)",
        );
    }
    if dedup == DedupMode::Off {
        for option in ["retention", "lease", "fingerprint", "store_result"] {
            if let Some(span) = options.span_of(option) {
                errors.push(
                    span,
                    format!("`{option}` has no effect with `dedup = off` (nothing is stored): remove it or turn dedup on"),
                );
            }
        }
    }
    if dedup != DedupMode::Transactional {
        for option in ["batch", "linger"] {
            if let Some(span) = options.span_of(option) {
                errors.push(
                    span,
                    format!("`{option}` groups messages into one database transaction: it needs `dedup = transactional`"),
                );
            }
        }
    }
    if let (Some(dedup), false) = (&options.dedup, sig.has_transaction)
        && dedup.value == DedupMode::Transactional
    {
        errors.push(
            dedup.name.span(),
            format!(
                "`dedup = transactional` runs the handler inside a database transaction: \
                     take it as an argument, e.g. `tx: {TRANSACTION_EXTRACTOR}`"
            ),
        );
    }
    if let (Some(subject), Some(dead)) = (&options.subject, &options.dead_letter)
        && subject.value.value() == dead.value.value()
    {
        errors.push(
                dead.value.span(),
                "`dead_letter` is the handler's own subject: dead letters would be consumed and dead-lettered again",
            );
    }
    if let Some(fingerprint) = &options.fingerprint
        && let Fingerprint::Expr(expr) = &fingerprint.value
    {
        check_names(expr, &sig.bound, "fingerprint", errors);
    }
    let Some(key) = &options.key else {
        if dedup != DedupMode::Off {
            errors.push(
                Span::call_site(),
                "missing `key = …`: what identifies the business operation (e.g. `key = order.id`, \
                 `key = header(\"Idempotency-Key\")`, `key = msg_id`), or `dedup = off`",
            );
        }
        return None;
    };
    Some(match &key.value {
        // A bare path that is not an argument names a key function.
        Key::Expr(Expr::Path(path)) if path.qself.is_none() && !binds(&sig.bound, &path.path) => {
            Key::Function(path.path.clone())
        }
        Key::Expr(expr) => {
            check_names(expr, &sig.bound, "key", errors);
            Key::Expr(expr.clone())
        }
        resolved => resolved.clone(),
    })
}

/// A handler consumes a stream or serves requests: checks the options that
/// belong to one or the other.
fn served(options: &Options, errors: &mut Errors) {
    match (&options.stream, &options.service) {
        (None, None) => errors.push(
            Span::call_site(),
            "missing `stream = \"…\"`: the JetStream stream this handler consumes \
             (or `service = \"…\"` to serve it as request/reply)",
        ),
        (Some(_), Some(service)) => errors.push(
            service.name.span(),
            "`service` serves the handler as request/reply, `stream` has it consume a stream: give one of them",
        ),
        (Some(_), None) => {
            if let Some(span) = options.span_of("version") {
                errors.push(span, "`version` is a service's version: it needs `service = \"…\"`");
            }
        }
        (None, Some(_)) => {
            if let Some(store) = &options.store_result
                && !store.value
            {
                errors.push(
                    store.name.span(),
                    "a service answers every repeat of a request with the stored result: \
                     with `store_result = false` repeats would get an empty body; remove it",
                );
            }
            if options.subject.is_none() {
                errors.push(
                    Span::call_site(),
                    "missing `subject = \"…\"`: the subject the service's requests arrive on",
                );
            }
            for option in [
                "consumer",
                "dead_letter",
                "start",
                "retry",
                "batch",
                "linger",
                "on_duplicate",
            ] {
                if let Some(span) = options.span_of(option) {
                    errors.push(
                        span,
                        format!("`{option}` is for stream handlers: a service handler answers each request, and the client asks again"),
                    );
                }
            }
        }
    }
}

fn binds(bound: &BTreeSet<String>, path: &Path) -> bool {
    path.get_ident()
        .is_some_and(|ident| bound.contains(&ident.to_string()))
}

/// Reports local-looking names (lower-case, used as the base of a field
/// access, method call or index) that no argument binds.
fn check_names(expr: &Expr, bound: &BTreeSet<String>, option: &str, errors: &mut Errors) {
    let mut bases = Bases::default();
    bases.visit_expr(expr);
    for ident in bases.0 {
        let name = ident.to_string();
        let local = name.starts_with(|c: char| c.is_lowercase() || c == '_');
        if local && !bound.contains(&name) {
            let known: Vec<&str> = bound.iter().map(String::as_str).collect();
            let hint = if known.is_empty() {
                "the handler has no named arguments".to_owned()
            } else {
                format!("its arguments bind: {}", known.join(", "))
            };
            errors.push(
                ident.span(),
                format!("`{name}` in `{option}` is not an argument of this handler; {hint}"),
            );
        }
    }
}

/// The single identifiers expressions are built on: `x` in `x.a`, `x.f()`,
/// `x[0]`.
#[derive(Default)]
struct Bases(Vec<syn::Ident>);

impl Bases {
    fn base(&mut self, expr: &Expr) {
        if let Expr::Path(path) = expr
            && let (None, Some(ident)) = (&path.qself, path.path.get_ident())
        {
            self.0.push(ident.clone());
        }
    }
}

impl<'ast> Visit<'ast> for Bases {
    fn visit_expr_field(&mut self, e: &'ast syn::ExprField) {
        self.base(&e.base);
        syn::visit::visit_expr_field(self, e);
    }

    fn visit_expr_method_call(&mut self, e: &'ast syn::ExprMethodCall) {
        self.base(&e.receiver);
        syn::visit::visit_expr_method_call(self, e);
    }

    fn visit_expr_index(&mut self, e: &'ast syn::ExprIndex) {
        self.base(&e.expr);
        syn::visit::visit_expr_index(self, e);
    }

    fn visit_expr_tuple(&mut self, e: &'ast syn::ExprTuple) {
        e.elems.iter().for_each(|elem| self.base(elem));
        syn::visit::visit_expr_tuple(self, e);
    }

    fn visit_expr_reference(&mut self, e: &'ast syn::ExprReference) {
        self.base(&e.expr);
        syn::visit::visit_expr_reference(self, e);
    }
}
