//! The attribute's options: parsed from `name = value` pairs into a typed
//! struct, with every malformed value reported at its own token.

use std::time::Duration;

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitInt, LitStr, Token};

use crate::errors::Errors;

/// Every option the attribute accepts, for "did you mean" and the docs.
pub const OPTION_NAMES: &[&str] = &[
    "name",
    "stream",
    "consumer",
    "subject",
    "key",
    "dedup",
    "retention",
    "lease",
    "retry",
    "dead_letter",
    "concurrency",
    "batch",
    "linger",
    "on_missing_key",
    "fingerprint",
    "store_result",
    "on_duplicate",
    "start",
    "service",
    "version",
];

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
pub enum KeySource {
    /// An expression over the handler's arguments.
    Expr(Expr),
    /// `header("Name")`.
    Header(LitStr),
    /// `msg_id`: the broker message id.
    MessageId,
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
    pub key: Option<Given<KeySource>>,
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

impl Options {
    /// Parses every option, collecting every error.
    pub fn from_raw(raw: RawOptions, errors: &mut Errors) -> Options {
        let mut options = Options::default();
        for RawOption { name, value } in raw.0 {
            let label = name.to_string();
            if !OPTION_NAMES.contains(&label.as_str()) {
                errors.push(name.span(), unknown_option(&label));
                continue;
            }
            if options.has(&label) {
                errors.push(
                    name.span(),
                    format!("duplicate option `{label}`: give each option once"),
                );
                continue;
            }
            options.set(name, value, errors);
        }
        options
    }

    fn has(&self, label: &str) -> bool {
        match label {
            "name" => self.name.is_some(),
            "start" => self.start.is_some(),
            "stream" => self.stream.is_some(),
            "consumer" => self.consumer.is_some(),
            "subject" => self.subject.is_some(),
            "key" => self.key.is_some(),
            "dedup" => self.dedup.is_some(),
            "retention" => self.retention.is_some(),
            "lease" => self.lease.is_some(),
            "retry" => self.retry.is_some(),
            "dead_letter" => self.dead_letter.is_some(),
            "concurrency" => self.concurrency.is_some(),
            "batch" => self.batch.is_some(),
            "linger" => self.linger.is_some(),
            "on_missing_key" => self.on_missing_key.is_some(),
            "fingerprint" => self.fingerprint.is_some(),
            "on_duplicate" => self.on_duplicate.is_some(),
            "service" => self.service.is_some(),
            "version" => self.version.is_some(),
            _ => self.store_result.is_some(),
        }
    }

    fn set(&mut self, name: Ident, value: Option<Expr>, errors: &mut Errors) {
        let label = name.to_string();
        // `store_result` alone is a flag; every other option needs a value.
        let value = match (value, label.as_str()) {
            (None, "store_result") => {
                self.store_result = Some(Given { name, value: true });
                return;
            }
            (None, _) => {
                errors.push(
                    name.span(),
                    format!("`{label}` needs a value: `{label} = …`"),
                );
                return;
            }
            (Some(value), _) => value,
        };
        match label.as_str() {
            "name" => {
                if let Some(lit) = string(&value, &label, errors) {
                    let text = lit.value();
                    if text.is_empty()
                        || text.len() > 64
                        || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        errors.push(
                            lit.span(),
                            "`name` must be 1 to 64 letters, digits, `_` or `-`: it names the handler's claims, consumer and stats",
                        );
                    }
                    self.name = Some(Given::new(&name, lit));
                }
            }
            "service" => {
                if let Some(lit) = string(&value, &label, errors) {
                    let text = lit.value();
                    if text.is_empty()
                        || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                    {
                        errors.push(
                            lit.span(),
                            "`service` must be a NATS micro service name: letters, digits, `_` or `-`",
                        );
                    }
                    self.service = Some(Given::new(&name, lit));
                }
            }
            "version" => {
                if let Some(lit) = string(&value, &label, errors) {
                    let text = lit.value();
                    let parts: Vec<&str> = text.split(['-', '+']).next().unwrap_or("").split('.').collect();
                    if parts.len() != 3 || !parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
                        errors.push(lit.span(), "`version` is the service's semantic version, e.g. \"1.2.0\"");
                    }
                    self.version = Some(Given::new(&name, lit));
                }
            }
            "on_duplicate" => match value {
                Expr::Path(path) if path.qself.is_none() => {
                    self.on_duplicate = Some(Given::new(&name, path.path));
                }
                other => errors.push(
                    other.span(),
                    "`on_duplicate` names an async function: `on_duplicate = announce_again`, called as \
                     `announce_again(stored_result, <the handler's arguments>)`",
                ),
            },
            "start" => match (&value, word(&value).as_deref()) {
                (_, Some("all")) => self.start = Some(Given::new(&name, StartAt::All)),
                (_, Some("new")) => self.start = Some(Given::new(&name, StartAt::New)),
                (
                    Expr::Lit(ExprLit {
                        lit: Lit::Int(int), ..
                    }),
                    _,
                ) => match int.base10_parse::<u64>() {
                    Ok(0) | Err(_) => errors.push(
                        int.span(),
                        "`start = <sequence>` takes a stream sequence from 1",
                    ),
                    Ok(_) => self.start = Some(Given::new(&name, StartAt::Sequence(int.clone()))),
                },
                _ => errors.push(
                    value.span(),
                    "`start` is `all` (every message in the stream), `new` (only messages published from now on) or a stream sequence",
                ),
            },
            "stream" | "consumer" => {
                if let Some(lit) = string(&value, &label, errors) {
                    if lit.value().is_empty() || lit.value().contains(['.', ' ', '*', '>']) {
                        errors.push(lit.span(), format!("`{label}` must be a non-empty name without `.`, spaces or wildcards"));
                    }
                    let slot = if label == "stream" {
                        &mut self.stream
                    } else {
                        &mut self.consumer
                    };
                    *slot = Some(Given::new(&name, lit));
                }
            }
            "subject" | "dead_letter" => {
                if let Some(lit) = string(&value, &label, errors) {
                    let checked = if label == "subject" {
                        idem_grammar::subject::validate_filter(&lit.value())
                    } else {
                        idem_grammar::subject::validate_publish(&lit.value())
                    };
                    if let Err(problem) = checked {
                        errors.push(lit.span(), format!("invalid `{label}`: {problem}"));
                    }
                    let slot = if label == "subject" {
                        &mut self.subject
                    } else {
                        &mut self.dead_letter
                    };
                    *slot = Some(Given::new(&name, lit));
                }
            }
            "key" => self.key = key_source(value).map(|v| Given::new(&name, v)),
            "dedup" => match word(&value).as_deref() {
                Some("off") => self.dedup = Some(Given::new(&name, DedupMode::Off)),
                Some("kv") => self.dedup = Some(Given::new(&name, DedupMode::Kv)),
                Some("transactional") => {
                    self.dedup = Some(Given::new(&name, DedupMode::Transactional))
                }
                _ => errors.push(
                    value.span(),
                    "`dedup` is one of `off`, `kv` (the default) or `transactional`",
                ),
            },
            "retention" | "lease" => {
                if let Some(duration) =
                    string(&value, &label, errors).and_then(|lit| duration(&lit, errors))
                {
                    if duration.is_zero() {
                        errors.push(value.span(), format!("`{label}` must be longer than zero"));
                    }
                    let slot = if label == "retention" {
                        &mut self.retention
                    } else {
                        &mut self.lease
                    };
                    *slot = Some(Given::new(&name, duration));
                }
            }
            "linger" => {
                if let Some(duration) =
                    string(&value, &label, errors).and_then(|lit| duration(&lit, errors))
                {
                    self.linger = Some(Given::new(&name, duration));
                }
            }
            "retry" => {
                crate::retry::check(&value, errors);
                self.retry = Some(Given::new(&name, value));
            }
            "concurrency" | "batch" => match &value {
                Expr::Lit(ExprLit {
                    lit: Lit::Int(int), ..
                }) => {
                    match int.base10_parse::<u32>() {
                        Ok(0) => errors.push(int.span(), format!("`{label}` must be at least 1")),
                        Ok(_) => {}
                        Err(_) => errors.push(
                            int.span(),
                            format!("`{label}` must be a whole number from 1 to 4294967295"),
                        ),
                    }
                    let slot = if label == "batch" {
                        &mut self.batch
                    } else {
                        &mut self.concurrency
                    };
                    *slot = Some(Given::new(&name, int.clone()));
                }
                _ => errors.push(
                    value.span(),
                    format!("`{label}` takes an integer literal, e.g. `{label} = 16`"),
                ),
            },
            "on_missing_key" => match word(&value).as_deref() {
                Some("dead_letter") => {
                    self.on_missing_key = Some(Given::new(&name, MissingKey::DeadLetter))
                }
                Some("reject") => self.on_missing_key = Some(Given::new(&name, MissingKey::Reject)),
                _ => errors.push(
                    value.span(),
                    "`on_missing_key` is `dead_letter` (the default) or `reject`",
                ),
            },
            "fingerprint" => {
                let fingerprint = match word(&value).as_deref() {
                    Some("payload") => Fingerprint::Payload,
                    Some("none") => Fingerprint::None,
                    _ => Fingerprint::Expr(value),
                };
                self.fingerprint = Some(Given::new(&name, fingerprint));
            }
            _ => match &value {
                Expr::Lit(ExprLit {
                    lit: Lit::Bool(flag),
                    ..
                }) => self.store_result = Some(Given::new(&name, flag.value)),
                _ => errors.push(
                    value.span(),
                    "`store_result` is a flag: write `store_result` or `store_result = true`",
                ),
            },
        }
    }

    /// The span of an option given by name, for errors about it.
    pub fn span_of(&self, label: &str) -> Option<Span> {
        let span = |name: &Ident| Some(name.span());
        match label {
            "retention" => self.retention.as_ref().and_then(|g| span(&g.name)),
            "lease" => self.lease.as_ref().and_then(|g| span(&g.name)),
            "fingerprint" => self.fingerprint.as_ref().and_then(|g| span(&g.name)),
            "store_result" => self.store_result.as_ref().and_then(|g| span(&g.name)),
            "on_missing_key" => self.on_missing_key.as_ref().and_then(|g| span(&g.name)),
            "batch" => self.batch.as_ref().and_then(|g| span(&g.name)),
            "linger" => self.linger.as_ref().and_then(|g| span(&g.name)),
            "consumer" => self.consumer.as_ref().and_then(|g| span(&g.name)),
            "dead_letter" => self.dead_letter.as_ref().and_then(|g| span(&g.name)),
            "retry" => self.retry.as_ref().and_then(|g| span(&g.name)),
            "start" => self.start.as_ref().and_then(|g| span(&g.name)),
            "on_duplicate" => self.on_duplicate.as_ref().and_then(|g| span(&g.name)),
            "version" => self.version.as_ref().and_then(|g| span(&g.name)),
            _ => None,
        }
    }
}

fn unknown_option(label: &str) -> String {
    let closest = OPTION_NAMES
        .iter()
        .map(|known| (strsim::levenshtein(label, known), *known))
        .min()
        .filter(|(distance, _)| *distance <= 3);
    match closest {
        Some((_, known)) => format!("unknown option `{label}`; did you mean `{known}`?"),
        None => format!(
            "unknown option `{label}`; the options are: {}",
            OPTION_NAMES.join(", ")
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

fn key_source(value: Expr) -> Option<KeySource> {
    match value {
        Expr::Call(call)
            if matches!(&*call.func, Expr::Path(p) if p.path.is_ident("header"))
                && call.args.len() == 1 =>
        {
            match call.args.first() {
                Some(Expr::Lit(ExprLit {
                    lit: Lit::Str(name),
                    ..
                })) => Some(KeySource::Header(name.clone())),
                _ => Some(KeySource::Expr(Expr::Call(call))),
            }
        }
        Expr::Path(path) if path.path.is_ident("msg_id") => Some(KeySource::MessageId),
        other => Some(KeySource::Expr(other)),
    }
}
