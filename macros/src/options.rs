//! The attribute's options: parsed from `name = value` pairs into a typed
//! struct, with every malformed value reported at its own token.

use std::time::Duration;

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitInt, LitStr, Token};

use crate::errors::Errors;

/// One `name` or `name = value`.
pub struct RawOption {
    pub name: Ident,
    pub value: Option<Expr>,
}

impl Parse for RawOption {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let name: Ident = input.call(syn::ext::IdentExt::parse_any)?;
        let value = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            Some(input.parse()?)
        } else {
            None
        };
        Ok(RawOption { name, value })
    }
}

/// The raw option list.
pub struct RawOptions(pub Punctuated<RawOption, Token![,]>);

impl Parse for RawOptions {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        Punctuated::parse_terminated(input).map(RawOptions)
    }
}

/// Where the idempotency key comes from.
#[derive(Clone)]
pub enum Key {
    /// An expression over the handler's arguments.
    Expr(Expr),
    /// `header("Name")`: a header's value.
    Header(LitStr),
    /// `msg_id`: the broker message id.
    MessageId,
    /// A function `fn(&Delivery) -> impl ToKey` (a bare path that is not an
    /// argument; told apart from `Expr` by validation).
    Function(syn::Path),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DedupMode {
    Off,
    Kv,
    Transactional,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MissingKey {
    DeadLetter,
    Reject,
}

/// Where a new durable consumer starts (`start = …`).
pub enum StartAt {
    All,
    New,
    Sequence(LitInt),
}

pub enum Fingerprint {
    Payload,
    None,
    Expr(Expr),
}

/// A value together with the option name it was given under (for errors
/// that concern the option as a whole).
pub struct Given<T> {
    pub name: Ident,
    pub value: T,
}

impl<T> Given<T> {
    fn new(name: &Ident, value: T) -> Self {
        Given {
            name: name.clone(),
            value,
        }
    }
}

/// The typed options.
#[derive(Default)]
pub struct Options {
    pub name: Option<Given<LitStr>>,
    pub stream: Option<Given<LitStr>>,
    pub consumer: Option<Given<LitStr>>,
    pub subject: Option<Given<LitStr>>,
    pub key: Option<Given<Key>>,
    pub dedup: Option<Given<DedupMode>>,
    pub retention: Option<Given<Duration>>,
    pub lease: Option<Given<Duration>>,
    pub retry: Option<Given<Expr>>,
    pub dead_letter: Option<Given<LitStr>>,
    pub concurrency: Option<Given<LitInt>>,
    pub batch: Option<Given<LitInt>>,
    pub linger: Option<Given<Duration>>,
    pub on_missing_key: Option<Given<MissingKey>>,
    pub fingerprint: Option<Given<Fingerprint>>,
    pub store_result: Option<Given<bool>>,
    pub on_duplicate: Option<Given<syn::Path>>,
    pub start: Option<Given<StartAt>>,
    pub service: Option<Given<LitStr>>,
    pub version: Option<Given<LitStr>>,
}

/// One option: its name, whether it may stand alone as a flag (`name`
/// meaning `name = true`), how its value is parsed into its field, and
/// whether that field was given (the name's token, for duplicates and for
/// errors about the option as a whole). Adding an option is adding an
/// entry to [`OPTIONS`] and its field to [`Options`].
pub struct Spec {
    pub name: &'static str,
    flag: bool,
    parse: fn(&mut Options, Ident, Expr, &mut Errors),
    given: fn(&Options) -> Option<&Ident>,
}

/// Every option the attribute accepts.
pub static OPTIONS: &[Spec] = &[
    Spec {
        name: "name",
        flag: false,
        parse: |o, name, value, errors| {
            o.name = handler_name(&value, errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.name),
    },
    Spec {
        name: "stream",
        flag: false,
        parse: |o, name, value, errors| {
            o.stream = plain_name(&value, "stream", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.stream),
    },
    Spec {
        name: "service",
        flag: false,
        parse: |o, name, value, errors| {
            o.service = service_name(&value, errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.service),
    },
    Spec {
        name: "version",
        flag: false,
        parse: |o, name, value, errors| {
            o.version = version(&value, errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.version),
    },
    Spec {
        name: "consumer",
        flag: false,
        parse: |o, name, value, errors| {
            o.consumer = plain_name(&value, "consumer", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.consumer),
    },
    Spec {
        name: "subject",
        flag: false,
        parse: |o, name, value, errors| {
            o.subject = subject(
                &value,
                "subject",
                idem_grammar::subject::validate_filter,
                errors,
            )
            .map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.subject),
    },
    Spec {
        name: "key",
        flag: false,
        parse: |o, name, value, _| o.key = Some(Given::new(&name, key(value))),
        given: |o| named(&o.key),
    },
    Spec {
        name: "dedup",
        flag: false,
        parse: |o, name, value, errors| {
            o.dedup = choice(
                &value,
                &[
                    ("off", DedupMode::Off),
                    ("kv", DedupMode::Kv),
                    ("transactional", DedupMode::Transactional),
                ],
                "`dedup` is one of `off`, `kv` (the default) or `transactional`",
                errors,
            )
            .map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.dedup),
    },
    Spec {
        name: "retention",
        flag: false,
        parse: |o, name, value, errors| {
            o.retention =
                positive_duration(&value, "retention", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.retention),
    },
    Spec {
        name: "lease",
        flag: false,
        parse: |o, name, value, errors| {
            o.lease = positive_duration(&value, "lease", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.lease),
    },
    Spec {
        name: "retry",
        flag: false,
        parse: |o, name, value, errors| {
            crate::retry::check(&value, errors);
            o.retry = Some(Given::new(&name, value));
        },
        given: |o| named(&o.retry),
    },
    Spec {
        name: "dead_letter",
        flag: false,
        parse: |o, name, value, errors| {
            o.dead_letter = subject(
                &value,
                "dead_letter",
                idem_grammar::subject::validate_publish,
                errors,
            )
            .map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.dead_letter),
    },
    Spec {
        name: "concurrency",
        flag: false,
        parse: |o, name, value, errors| {
            o.concurrency = count(&value, "concurrency", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.concurrency),
    },
    Spec {
        name: "batch",
        flag: false,
        parse: |o, name, value, errors| {
            o.batch = count(&value, "batch", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.batch),
    },
    Spec {
        name: "linger",
        flag: false,
        parse: |o, name, value, errors| {
            o.linger = string(&value, "linger", errors)
                .and_then(|lit| duration(&lit, errors))
                .map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.linger),
    },
    Spec {
        name: "on_missing_key",
        flag: false,
        parse: |o, name, value, errors| {
            o.on_missing_key = choice(
                &value,
                &[
                    ("dead_letter", MissingKey::DeadLetter),
                    ("reject", MissingKey::Reject),
                ],
                "`on_missing_key` is `dead_letter` (the default) or `reject`",
                errors,
            )
            .map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.on_missing_key),
    },
    Spec {
        name: "fingerprint",
        flag: false,
        parse: |o, name, value, _| {
            let fingerprint = match word(&value).as_deref() {
                Some("payload") => Fingerprint::Payload,
                Some("none") => Fingerprint::None,
                _ => Fingerprint::Expr(value),
            };
            o.fingerprint = Some(Given::new(&name, fingerprint));
        },
        given: |o| named(&o.fingerprint),
    },
    Spec {
        name: "store_result",
        flag: true,
        parse: |o, name, value, errors| {
            o.store_result = flag(&value, "store_result", errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.store_result),
    },
    Spec {
        name: "on_duplicate",
        flag: false,
        parse: |o, name, value, errors| {
            o.on_duplicate = hook(value, errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.on_duplicate),
    },
    Spec {
        name: "start",
        flag: false,
        parse: |o, name, value, errors| {
            o.start = start(&value, errors).map(|v| Given::new(&name, v))
        },
        given: |o| named(&o.start),
    },
];

fn named<T>(given: &Option<Given<T>>) -> Option<&Ident> {
    given.as_ref().map(|g| &g.name)
}

impl Options {
    /// Parses every option, collecting every error.
    pub fn from_raw(raw: RawOptions, errors: &mut Errors) -> Options {
        let mut options = Options::default();
        for RawOption { name, value } in raw.0 {
            let label = name.to_string();
            let Some(spec) = OPTIONS.iter().find(|spec| spec.name == label) else {
                errors.push(name.span(), unknown_option(&label));
                continue;
            };
            if (spec.given)(&options).is_some() {
                errors.push(
                    name.span(),
                    format!("duplicate option `{label}`: give each option once"),
                );
                continue;
            }
            let value = match value {
                Some(value) => value,
                None if spec.flag => syn::parse_quote_spanned!(name.span()=> true),
                None => {
                    errors.push(
                        name.span(),
                        format!("`{label}` needs a value: `{label} = …`"),
                    );
                    continue;
                }
            };
            (spec.parse)(&mut options, name, value, errors);
        }
        options
    }

    /// The span of an option given by name, for errors about it.
    pub fn span_of(&self, label: &str) -> Option<Span> {
        let spec = OPTIONS.iter().find(|spec| spec.name == label)?;
        (spec.given)(self).map(Ident::span)
    }
}

fn handler_name(value: &Expr, errors: &mut Errors) -> Option<LitStr> {
    let lit = string(value, "name", errors)?;
    let text = lit.value();
    if text.is_empty()
        || text.len() > 64
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push(
            lit.span(),
            "`name` must be 1 to 64 letters, digits, `_` or `-`: it names the handler's claims, consumer and stats",
        );
    }
    Some(lit)
}

/// A stream or consumer name.
fn plain_name(value: &Expr, label: &str, errors: &mut Errors) -> Option<LitStr> {
    let lit = string(value, label, errors)?;
    if lit.value().is_empty() || lit.value().contains(['.', ' ', '*', '>']) {
        errors.push(
            lit.span(),
            format!("`{label}` must be a non-empty name without `.`, spaces or wildcards"),
        );
    }
    Some(lit)
}

fn service_name(value: &Expr, errors: &mut Errors) -> Option<LitStr> {
    let lit = string(value, "service", errors)?;
    let text = lit.value();
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push(
            lit.span(),
            "`service` must be a NATS micro service name: letters, digits, `_` or `-`",
        );
    }
    Some(lit)
}

fn version(value: &Expr, errors: &mut Errors) -> Option<LitStr> {
    let lit = string(value, "version", errors)?;
    let text = lit.value();
    let core = text.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3
        || !parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        errors.push(
            lit.span(),
            "`version` is the service's semantic version, e.g. \"1.2.0\"",
        );
    }
    Some(lit)
}

fn subject(
    value: &Expr,
    label: &str,
    check: fn(&str) -> Result<(), idem_grammar::subject::SubjectError>,
    errors: &mut Errors,
) -> Option<LitStr> {
    let lit = string(value, label, errors)?;
    if let Err(problem) = check(&lit.value()) {
        errors.push(lit.span(), format!("invalid `{label}`: {problem}"));
    }
    Some(lit)
}

/// One of a few bare words.
fn choice<T: Copy>(
    value: &Expr,
    words: &[(&str, T)],
    expected: &str,
    errors: &mut Errors,
) -> Option<T> {
    let given = word(value);
    let found = words
        .iter()
        .find(|(word, _)| given.as_deref() == Some(*word))
        .map(|(_, choice)| *choice);
    if found.is_none() {
        errors.push(value.span(), expected);
    }
    found
}

fn positive_duration(value: &Expr, label: &str, errors: &mut Errors) -> Option<Duration> {
    let duration = string(value, label, errors).and_then(|lit| duration(&lit, errors))?;
    if duration.is_zero() {
        errors.push(value.span(), format!("`{label}` must be longer than zero"));
    }
    Some(duration)
}

/// A whole number from 1.
fn count(value: &Expr, label: &str, errors: &mut Errors) -> Option<LitInt> {
    let Expr::Lit(ExprLit {
        lit: Lit::Int(int), ..
    }) = value
    else {
        errors.push(
            value.span(),
            format!("`{label}` takes an integer literal, e.g. `{label} = 16`"),
        );
        return None;
    };
    match int.base10_parse::<u32>() {
        Ok(0) => errors.push(int.span(), format!("`{label}` must be at least 1")),
        Ok(_) => {}
        Err(_) => errors.push(
            int.span(),
            format!("`{label}` must be a whole number from 1 to 4294967295"),
        ),
    }
    Some(int.clone())
}

fn flag(value: &Expr, label: &str, errors: &mut Errors) -> Option<bool> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Bool(flag),
            ..
        }) => Some(flag.value),
        _ => {
            errors.push(
                value.span(),
                format!("`{label}` is a flag: write `{label}` or `{label} = true`"),
            );
            None
        }
    }
}

fn hook(value: Expr, errors: &mut Errors) -> Option<syn::Path> {
    match value {
        Expr::Path(path) if path.qself.is_none() => Some(path.path),
        other => {
            errors.push(
                other.span(),
                "`on_duplicate` names an async function: `on_duplicate = announce_again`, called as \
                 `announce_again(stored_result, <the handler's arguments>)`",
            );
            None
        }
    }
}

fn start(value: &Expr, errors: &mut Errors) -> Option<StartAt> {
    match (value, word(value).as_deref()) {
        (_, Some("all")) => Some(StartAt::All),
        (_, Some("new")) => Some(StartAt::New),
        (
            Expr::Lit(ExprLit {
                lit: Lit::Int(int), ..
            }),
            _,
        ) => match int.base10_parse::<u64>() {
            Ok(0) | Err(_) => {
                errors.push(
                    int.span(),
                    "`start = <sequence>` takes a stream sequence from 1",
                );
                None
            }
            Ok(_) => Some(StartAt::Sequence(int.clone())),
        },
        _ => {
            errors.push(
                value.span(),
                "`start` is `all` (every message in the stream), `new` (only messages published from now on) or a stream sequence",
            );
            None
        }
    }
}

fn unknown_option(label: &str) -> String {
    let closest = OPTIONS
        .iter()
        .map(|spec| (strsim::levenshtein(label, spec.name), spec.name))
        .min()
        .filter(|(distance, _)| *distance <= 3);
    match closest {
        Some((_, known)) => format!("unknown option `{label}`; did you mean `{known}`?"),
        None => format!(
            "unknown option `{label}`; the options are: {}",
            OPTIONS
                .iter()
                .map(|spec| spec.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn string(value: &Expr, label: &str, errors: &mut Errors) -> Option<LitStr> {
    match value {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Some(lit.clone()),
        _ => {
            errors.push(
                value.span(),
                format!("`{label}` takes a string literal, e.g. `{label} = \"…\"`"),
            );
            None
        }
    }
}

/// A bare identifier such as `off`, `payload`, `msg_id`.
fn word(value: &Expr) -> Option<String> {
    match value {
        Expr::Path(path) if path.qself.is_none() => path.path.get_ident().map(Ident::to_string),
        _ => None,
    }
}

fn duration(lit: &LitStr, errors: &mut Errors) -> Option<Duration> {
    match idem_grammar::duration::parse(&lit.value()) {
        Ok(duration) => Some(duration),
        Err(invalid) => {
            errors.push(lit.span(), invalid.to_string());
            None
        }
    }
}

/// Where the key comes from, as written: `header("…")`, `msg_id`, or an
/// expression (which validation resolves against the arguments: a bare
/// path that is not an argument names a key function).
fn key(value: Expr) -> Key {
    match value {
        Expr::Call(call)
            if matches!(&*call.func, Expr::Path(p) if p.path.is_ident("header"))
                && call.args.len() == 1 =>
        {
            match call.args.first() {
                Some(Expr::Lit(ExprLit {
                    lit: Lit::Str(name),
                    ..
                })) => Key::Header(name.clone()),
                _ => Key::Expr(Expr::Call(call)),
            }
        }
        Expr::Path(path) if path.path.is_ident("msg_id") => Key::MessageId,
        other => Key::Expr(other),
    }
}
