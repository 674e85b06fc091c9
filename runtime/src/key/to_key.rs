//! What can be an idempotency key: [`ToKey`], and the key sources of the
//! `#[idempotent(key = …)]` attribute.

use bytes::Bytes;

use super::{IdempotencyKey, KeyError};
use crate::Delivery;

/// A value that identifies a business operation: its bytes become the
/// idempotency key.
///
/// Strings and byte strings are taken as they are, integers in decimal,
/// UUIDs hyphenated. Tuples combine their parts injectively (each part
/// length-prefixed), so `(1, 23)` and `(12, 3)` are different keys. `None`
/// means "no key" ([`KeyError::NoneValue`]); the handler's `on_missing_key`
/// decides what happens then.
///
/// ```
/// use idem::key::to_key;
///
/// assert_eq!(to_key(&"order-7")?.as_bytes(), b"order-7");
/// assert_eq!(to_key(&42u64)?.as_bytes(), b"42");
/// assert_ne!(to_key(&(1, 23))?, to_key(&(12, 3))?);
/// assert!(to_key(&None::<u64>).is_err());
/// # Ok::<(), idem::key::KeyError>(())
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an idempotency key",
    label = "this key expression has type `{Self}`",
    note = "idem::key::ToKey is implemented for strings, byte strings, integers, UUIDs, Option and tuples of these",
    note = "key on a field that identifies the operation (e.g. `key = order.id`), or implement ToKey for your type"
)]
pub trait ToKey {
    /// Appends the key's bytes.
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError>;
}

/// The idempotency key of `value`.
pub fn to_key<K: ToKey + ?Sized>(value: &K) -> Result<IdempotencyKey, KeyError> {
    let mut bytes = Vec::new();
    value.write_key(&mut bytes)?;
    IdempotencyKey::new(bytes)
}

/// The key from a header (`key = header("Idempotency-Key")`).
///
/// ```
/// use idem::{Delivery, key::from_header};
///
/// let delivery = Delivery::new("orders", "{}").with_header("Idempotency-Key", "abc");
/// assert_eq!(from_header(&delivery, "Idempotency-Key")?.as_bytes(), b"abc");
/// assert!(from_header(&delivery, "Other").is_err());
/// # Ok::<(), idem::key::KeyError>(())
/// ```
pub fn from_header(delivery: &Delivery, name: &'static str) -> Result<IdempotencyKey, KeyError> {
    let value = delivery
        .header(name)
        .ok_or(KeyError::MissingHeader { name })?;
    IdempotencyKey::new(value)
}

/// The key from the broker message id (`key = msg_id`): the producer's
/// `Nats-Msg-Id`, the "inner message id" of the classic design.
pub fn from_message_id(delivery: &Delivery) -> Result<IdempotencyKey, KeyError> {
    let id = delivery.message_id().ok_or(KeyError::MissingMessageId)?;
    IdempotencyKey::new(id)
}

impl ToKey for str {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        out.extend_from_slice(self.as_bytes());
        Ok(())
    }
}

impl ToKey for String {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        self.as_str().write_key(out)
    }
}

impl ToKey for [u8] {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        out.extend_from_slice(self);
        Ok(())
    }
}

impl ToKey for Vec<u8> {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        self.as_slice().write_key(out)
    }
}

impl ToKey for Bytes {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        self.as_ref().write_key(out)
    }
}

impl ToKey for uuid::Uuid {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        out.extend_from_slice(
            self.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        Ok(())
    }
}

impl ToKey for IdempotencyKey {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        self.as_bytes().write_key(out)
    }
}

impl<T: ToKey + ?Sized> ToKey for &T {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        (**self).write_key(out)
    }
}

impl<T: ToKey> ToKey for Option<T> {
    fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
        self.as_ref().ok_or(KeyError::NoneValue)?.write_key(out)
    }
}

macro_rules! integer_keys {
    ($($int:ty),*) => {$(
        impl ToKey for $int {
            fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
                out.extend_from_slice(self.to_string().as_bytes());
                Ok(())
            }
        }
    )*};
}

integer_keys!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

macro_rules! tuple_keys {
    ($($part:ident),+) => {
        impl<$($part: ToKey),+> ToKey for ($($part,)+) {
            #[allow(non_snake_case)]
            fn write_key(&self, out: &mut Vec<u8>) -> Result<(), KeyError> {
                let ($($part,)+) = self;
                $(
                    let mut part = Vec::new();
                    $part.write_key(&mut part)?;
                    let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&part);
                )+
                Ok(())
            }
        }
    };
}

tuple_keys!(A);
tuple_keys!(A, B);
tuple_keys!(A, B, C);
tuple_keys!(A, B, C, D);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_type_yields_its_natural_bytes() {
        let id = uuid::Uuid::nil();
        assert_eq!(
            to_key(&id).expect("uuid").as_bytes(),
            b"00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(to_key(&-5i32).expect("int").as_bytes(), b"-5");
        assert_eq!(to_key(&String::from("s")).expect("string").as_bytes(), b"s");
        assert_eq!(to_key(&Some("x")).expect("some").as_bytes(), b"x");
        assert_eq!(to_key(&b"raw"[..]).expect("bytes").as_bytes(), b"raw");
    }

    #[test]
    fn tuples_are_injective_and_empty_or_none_is_no_key() {
        assert_ne!(to_key(&("ab", "c")).ok(), to_key(&("a", "bc")).ok());
        assert_eq!(to_key(&("", "")).map(|k| k.as_bytes().len()), Ok(8));
        assert_eq!(to_key(&""), Err(KeyError::Empty));
        assert_eq!(to_key(&None::<String>), Err(KeyError::NoneValue));
        assert_eq!(to_key(&(1, None::<u8>)), Err(KeyError::NoneValue));
    }
}
