//! The handler function's shape: async, free, not generic, returning a
//! `Result`, with extractor arguments whose patterns bind the names a key
//! expression may use.

use std::collections::BTreeSet;

use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, ItemFn, Pat, PathArguments, ReturnType, Type};

use crate::errors::Errors;

/// Extractors that read the payload; a handler takes at most one.
const PAYLOAD_EXTRACTORS: &[&str] = &["Json", "Bytes"];
/// The transaction extractor of `dedup = transactional`.
pub const TRANSACTION_EXTRACTOR: &str = "Tx";

pub struct Arg {
    pub pat: Pat,
    pub ty: Type,
}

pub struct Signature {
    pub args: Vec<Arg>,
    /// The `Ok` type of the returned `Result`.
    pub ok_type: Option<Type>,
    /// Every name the argument patterns bind.
    pub bound: BTreeSet<String>,
    pub has_transaction: bool,
}

pub fn analyze(item: &ItemFn, errors: &mut Errors) -> Signature {
    let sig = &item.sig;
    if sig.asyncness.is_none() {
        errors.push(
            sig.fn_token.span(),
            "#[idempotent] handlers must be `async fn`",
        );
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.push(
            sig.generics.span(),
            "#[idempotent] handlers cannot be generic: the runtime needs one concrete type per handler",
        );
    }
    let mut args = Vec::new();
    let mut payload: Option<String> = None;
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(receiver) => errors.push(
                receiver.span(),
                "#[idempotent] handlers are free functions: take shared things as `State<T>`, not `self`",
            ),
            FnArg::Typed(typed) => {
                let name = last_segment(&typed.ty);
                if let Some(name) = name.as_deref().filter(|n| PAYLOAD_EXTRACTORS.contains(n)) {
                    match &payload {
                        Some(first) => errors.push(
                            typed.ty.span(),
                            format!(
                                "two payload extractors: `{first}` already reads the payload, so `{name}` cannot; take one"
                            ),
                        ),
                        None => payload = Some(name.to_owned()),
                    }
                }
                args.push(Arg {
                    pat: (*typed.pat).clone(),
                    ty: (*typed.ty).clone(),
                });
            }
        }
    }
    let ok_type = match &sig.output {
        ReturnType::Type(_, ty) => result_ok_type(ty).or_else(|| {
            errors.push(
                ty.span(),
                "#[idempotent] handlers return `Result<T, E>` where E: Into<idem::HandlerError>",
            );
            None
        }),
        ReturnType::Default => {
            errors.push(
                sig.ident.span(),
                "#[idempotent] handlers return `Result<T, E>` (e.g. `Result<(), HandlerError>`) so failures can be retried",
            );
            None
        }
    };
    let mut bound = BTreeSet::new();
    for arg in &args {
        bind_names(&arg.pat, &mut bound);
    }
    let has_transaction = args.iter().any(|a| is_transaction(&a.ty));
    Signature {
        args,
        ok_type,
        bound,
        has_transaction,
    }
}

/// Whether `ty` is the transaction extractor (`Tx`, or a path ending in it).
pub fn is_transaction(ty: &Type) -> bool {
    last_segment(ty).as_deref() == Some(TRANSACTION_EXTRACTOR)
}

fn last_segment(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(path) => path.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

/// `Result<T, E>`, or an alias such as `io::Result<T>` or `IoResult<T>`
/// (a name ending in `Result`) → `T`. Whether the error converts into a
/// `HandlerError` is left to the type checker.
fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if !last.ident.to_string().ends_with("Result") {
        return None;
    }
    let PathArguments::AngleBracketed(generics) = &last.arguments else {
        return None;
    };
    generics.args.iter().find_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty.clone()),
        _ => None,
    })
}

fn bind_names(pat: &Pat, out: &mut BTreeSet<String>) {
    match pat {
        Pat::Ident(ident) => {
            out.insert(ident.ident.to_string());
            if let Some((_, sub)) = &ident.subpat {
                bind_names(sub, out);
            }
        }
        Pat::TupleStruct(p) => p.elems.iter().for_each(|e| bind_names(e, out)),
        Pat::Tuple(p) => p.elems.iter().for_each(|e| bind_names(e, out)),
        Pat::Struct(p) => p.fields.iter().for_each(|f| bind_names(&f.pat, out)),
        Pat::Reference(p) => bind_names(&p.pat, out),
        Pat::Type(p) => bind_names(&p.pat, out),
        Pat::Paren(p) => bind_names(&p.pat, out),
        Pat::Slice(p) => p.elems.iter().for_each(|e| bind_names(e, out)),
        _ => {}
    }
}

/// The pattern with `mut` and `ref` removed, for binding by reference in the
/// key and fingerprint functions.
pub fn by_reference(pat: &Pat) -> Pat {
    let mut pat = pat.clone();
    strip_binding_modes(&mut pat);
    pat
}

fn strip_binding_modes(pat: &mut Pat) {
    match pat {
        Pat::Ident(ident) => {
            ident.mutability = None;
            ident.by_ref = None;
            if let Some((_, sub)) = &mut ident.subpat {
                strip_binding_modes(sub);
            }
        }
        Pat::TupleStruct(p) => p.elems.iter_mut().for_each(strip_binding_modes),
        Pat::Tuple(p) => p.elems.iter_mut().for_each(strip_binding_modes),
        Pat::Struct(p) => p
            .fields
            .iter_mut()
            .for_each(|f| strip_binding_modes(&mut f.pat)),
        Pat::Type(p) => strip_binding_modes(&mut p.pat),
        Pat::Paren(p) => strip_binding_modes(&mut p.pat),
        Pat::Slice(p) => p.elems.iter_mut().for_each(strip_binding_modes),
        _ => {}
    }
}
