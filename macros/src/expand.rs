//! The expansion: a unit struct named after the function, implementing
//! `idem::handler::Handler` by calls into typed runtime functions. The
//! function itself stays callable as `name::run(...)`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ItemFn;
use syn::spanned::Spanned;

use crate::options::{DedupMode, Fingerprint, Key, MissingKey, Options, StartAt};
use crate::signature::{Signature, by_reference};

pub fn expand(item: ItemFn, options: &Options, sig: &Signature, key: Option<Key>) -> TokenStream {
    let vis = &item.vis;
    let name = &item.sig.ident;
    let docs: Vec<_> = item
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .collect();
    let other_attrs: Vec<_> = item
        .attrs
        .iter()
        .filter(|a| !a.path().is_ident("doc"))
        .collect();
    let inputs = &item.sig.inputs;
    let output = &item.sig.output;
    let body = &item.block;

    let arg_types: Vec<_> = sig.args.iter().map(|a| &a.ty).collect();
    let key_pats: Vec<_> = sig.args.iter().map(|a| by_reference(&a.pat)).collect();
    let arg_vars: Vec<_> = (0..sig.args.len())
        .map(|i| format_ident!("__idem_arg{i}"))
        .collect();
    let ok_type = sig
        .ok_type
        .as_ref()
        .map_or_else(|| quote!(()), |t| quote!(#t));

    let config = config(name, options);
    let key_fn = key_fn(&key, &key_pats);
    let fingerprint_fn = fingerprint_fn(options, &key_pats);
    let encode_result_fn = encode_result_fn(options, sig);
    let on_duplicate_fn = on_duplicate_fn(options, sig, &ok_type, &arg_vars);

    quote! {
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #name;

        impl #name {
            /// The handler's body, callable directly (e.g. in unit tests).
            #(#other_attrs)*
            #vis async fn run(#inputs) #output #body
        }

        impl ::idem::__private::Handler for #name {
            type Args = (#(#arg_types,)*);
            type Output = #ok_type;

            fn config(&self) -> ::idem::__private::HandlerConfig {
                #config
            }

            #key_fn
            #fingerprint_fn
            #encode_result_fn
            #on_duplicate_fn

            async fn call(&self, args: Self::Args) -> ::core::result::Result<Self::Output, ::idem::__private::HandlerError> {
                let (#(#arg_vars,)*) = args;
                ::idem::__private::into_handler_result(Self::run(#(#arg_vars),*).await)
            }
        }
    }
}

fn config(name: &syn::Ident, options: &Options) -> TokenStream {
    // The handler's identity: `name = "…"`, else the function's name.
    let handler = options
        .name
        .as_ref()
        .map_or_else(|| name.to_string(), |given| given.value.value());
    let mut calls = TokenStream::new();
    let constructor = match (&options.service, &options.stream) {
        (Some(service), _) => {
            let service = &service.value;
            quote!(::idem::__private::HandlerConfig::service(#handler, #service))
        }
        (None, stream) => {
            let stream = stream.as_ref().map(|s| &s.value);
            quote!(::idem::__private::HandlerConfig::new(#handler, #stream))
        }
    };
    if let Some(version) = &options.version {
        let version = &version.value;
        calls.extend(quote!(.version(#version)));
    }
    if options.on_duplicate.is_some() {
        calls.extend(quote!(.on_duplicate(true)));
    }
    if let Some(consumer) = &options.consumer {
        let consumer = &consumer.value;
        calls.extend(quote!(.consumer(#consumer)));
    }
    if let Some(subject) = &options.subject {
        let subject = &subject.value;
        calls.extend(quote!(.subject(#subject)));
    }
    if let Some(dedup) = &options.dedup {
        let mode = match dedup.value {
            DedupMode::Off => quote!(Off),
            DedupMode::Kv => quote!(Kv),
            DedupMode::Transactional => quote!(Transactional),
        };
        calls.extend(quote!(.dedup(::idem::__private::Dedup::#mode)));
    }
    for (option, given) in [("retention", &options.retention), ("lease", &options.lease)] {
        if let Some(given) = given {
            let method = format_ident!("{option}");
            let millis = u64::try_from(given.value.as_millis()).unwrap_or(u64::MAX);
            calls.extend(quote!(.#method(::idem::__private::Duration::from_millis(#millis))));
        }
    }
    if let Some(retry) = &options.retry {
        let retry = &retry.value;
        calls.extend(quote_spanned!(retry.span()=> .retry(#retry)));
    }
    if let Some(dead) = &options.dead_letter {
        let dead = &dead.value;
        calls.extend(quote!(.dead_letter(#dead)));
    }
    if let Some(concurrency) = &options.concurrency {
        let concurrency = &concurrency.value;
        calls.extend(quote!(.concurrency(#concurrency)));
    }
    if let Some(batch) = &options.batch {
        let batch = &batch.value;
        calls.extend(quote!(.batch(#batch)));
    }
    if let Some(linger) = &options.linger {
        let micros = u64::try_from(linger.value.as_micros()).unwrap_or(u64::MAX);
        calls.extend(quote!(.linger(::idem::__private::Duration::from_micros(#micros))));
    }
    if let Some(missing) = &options.on_missing_key {
        let policy = match missing.value {
            MissingKey::DeadLetter => quote!(DeadLetter),
            MissingKey::Reject => quote!(Reject),
        };
        calls.extend(quote!(.on_missing_key(::idem::__private::OnMissingKey::#policy)));
    }
    if let Some(fingerprint) = &options.fingerprint {
        let source = match fingerprint.value {
            Fingerprint::Payload => quote!(Payload),
            Fingerprint::None => quote!(None),
            Fingerprint::Expr(_) => quote!(Custom),
        };
        calls.extend(quote!(.fingerprint(::idem::__private::FingerprintSource::#source)));
    }
    if let Some(store) = &options.store_result {
        let store = store.value;
        calls.extend(quote!(.store_result(#store)));
    }
    if let Some(start) = &options.start {
        let start = match &start.value {
            StartAt::All => quote!(::idem::__private::StartAt::All),
            StartAt::New => quote!(::idem::__private::StartAt::New),
            StartAt::Sequence(sequence) => quote!(::idem::__private::StartAt::Sequence(#sequence)),
        };
        calls.extend(quote!(.start(#start)));
    }
    quote!(#constructor #calls)
}

fn key_fn(key: &Option<Key>, pats: &[syn::Pat]) -> TokenStream {
    let body = match key {
        Some(Key::Expr(expr)) => {
            let borrowed = borrowed(expr);
            let value = quote_spanned!(expr.span()=> ::idem::__private::to_key(&#borrowed));
            quote! {
                let (#(#pats,)*) = args;
                #value
            }
        }
        Some(Key::Header(name)) => quote!(::idem::__private::from_header(delivery, #name)),
        Some(Key::MessageId) => quote!(::idem::__private::from_message_id(delivery)),
        Some(Key::Function(path)) => {
            quote_spanned!(path.span()=> ::idem::__private::to_key(&#path(delivery)))
        }
        // `dedup = off` without a key: the message itself, for logs.
        None => quote!(::idem::__private::delivery_key(delivery)),
    };
    quote! {
        #[allow(unused_variables, clippy::needless_borrow)]
        fn key(
            &self,
            args: &Self::Args,
            delivery: &::idem::__private::Delivery,
        ) -> ::core::result::Result<::idem::__private::IdempotencyKey, ::idem::__private::KeyError> {
            #body
        }
    }
}

fn fingerprint_fn(options: &Options, pats: &[syn::Pat]) -> TokenStream {
    let body = match options.fingerprint.as_ref().map(|f| &f.value) {
        None | Some(Fingerprint::Payload) => return TokenStream::new(),
        Some(Fingerprint::None) => quote!(::core::result::Result::Ok(::core::option::Option::None)),
        Some(Fingerprint::Expr(expr)) => {
            let borrowed = borrowed(expr);
            let value = quote_spanned!(expr.span()=> ::idem::__private::fingerprint_of(&#borrowed));
            quote! {
                let (#(#pats,)*) = args;
                #value
            }
        }
    };
    quote! {
        #[allow(unused_variables, clippy::needless_borrow)]
        fn fingerprint(
            &self,
            args: &Self::Args,
            delivery: &::idem::__private::Delivery,
        ) -> ::core::result::Result<::core::option::Option<::idem::__private::Fingerprint>, ::idem::__private::KeyError> {
            #body
        }
    }
}

fn encode_result_fn(options: &Options, sig: &Signature) -> TokenStream {
    // A service's replies are its stored results.
    let stores =
        options.service.is_some() || options.store_result.as_ref().is_some_and(|s| s.value);
    let Some(ok_type) = sig.ok_type.as_ref().filter(|_| stores) else {
        return TokenStream::new();
    };
    // Spanned at the `Ok` type: a type that cannot be stored is reported there.
    let encode =
        quote_spanned!(ok_type.span()=> ::idem::__private::encode_result::<#ok_type>(output));
    quote! {
        fn encode_result(
            &self,
            output: &Self::Output,
        ) -> ::core::result::Result<::core::option::Option<::idem::__private::Bytes>, ::idem::__private::SerdeJsonError> {
            #encode
        }
    }
}

/// `on_duplicate = hook`: `hook(stored_result, <the handler's arguments but
/// its Tx>)`. A duplicate has no transaction of its own to hand over: its
/// effect committed with the first delivery, and the `Tx` its delivery was
/// made with is closed (alone) or another message's (in a group commit),
/// whose statements would commit or roll back with that group.
fn on_duplicate_fn(
    options: &Options,
    sig: &Signature,
    ok_type: &TokenStream,
    arg_vars: &[syn::Ident],
) -> TokenStream {
    let Some(hook) = &options.on_duplicate else {
        return TokenStream::new();
    };
    let hook = &hook.value;
    let handed = arg_vars
        .iter()
        .zip(&sig.args)
        .filter(|(_, arg)| !crate::signature::is_transaction(&arg.ty))
        .map(|(var, _)| var);
    let call = quote_spanned!(hook.span()=> #hook(previous, #(#handed),*));
    quote! {
        fn on_duplicate(
            &self,
            args: Self::Args,
            stored: ::core::option::Option<::idem::__private::Bytes>,
        ) -> impl ::core::future::Future<Output = ::core::result::Result<(), ::idem::__private::HandlerError>> + Send {
            let (#(#arg_vars,)*) = args;
            ::idem::__private::on_duplicate::<#ok_type, _, _, _>(stored, move |previous| #call)
        }
    }
}

/// The key expression with tuple parts borrowed: the arguments are bound by
/// reference, and `(order.id, order.name)` must not move out of them.
fn borrowed(expr: &syn::Expr) -> TokenStream {
    match expr {
        syn::Expr::Tuple(tuple) => {
            let parts = tuple.elems.iter().map(|part| {
                let inner = borrowed(part);
                quote_spanned!(part.span()=> &#inner)
            });
            quote!((#(#parts,)*))
        }
        syn::Expr::Paren(paren) => borrowed(&paren.expr),
        other => quote_spanned!(other.span()=> (#other)),
    }
}
