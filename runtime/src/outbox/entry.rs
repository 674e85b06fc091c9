//! One outbox entry on disk: the outgoing message, versioned like claim
//! records so that the format can evolve.

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;
use crate::publisher::Outgoing;

const FORMAT_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) subject: String,
    pub(super) id: String,
    pub(super) payload: Vec<u8>,
    pub(super) headers: Vec<(String, String)>,
    pub(super) enqueued_at: UnixMillis,
}

impl Entry {
    pub(super) fn from_outgoing(message: &Outgoing, now: UnixMillis) -> Self {
        let headers = message.header_pairs();
        Entry {
            subject: message.subject.clone(),
            id: message.id.clone(),
            payload: message.payload.to_vec(),
            headers,
            enqueued_at: now,
        }
    }

    pub(super) fn to_outgoing(&self) -> Outgoing {
        Outgoing::new(self.subject.clone(), self.payload.clone())
            .with_id(self.id.clone())
            .with_header_pairs(self.headers.iter().cloned())
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first() {
            Some((&FORMAT_VERSION, body)) => postcard::from_bytes(body).ok(),
            _ => None,
        }
    }
}
