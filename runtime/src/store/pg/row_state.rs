//! The inbox's `state` column: the one place its spellings live. Every
//! read parses it into [`RowState`] (a value this idem does not know is an
//! error naming it — fail closed), every write formats one.

use crate::claim::{ClaimState, Ending};

/// A claim row's state as the table spells it (the column's `CHECK`
/// constraint allows exactly these).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum RowState {
    /// Claimed; for the inbox also a key kept for its payload while its
    /// dead letter is not stored.
    Pending,
    /// Released after a retryable failure: its own payload's to claim again.
    Released,
    /// Completed.
    Done,
    /// Dead-lettered.
    Dead,
}

/// A `state` value this version of idem does not know.
#[derive(Debug, thiserror::Error)]
#[error("idem_inbox.state {0:?} is not a claim state this idem knows")]
pub(crate) struct UnknownState(pub(crate) String);

impl RowState {
    /// The column's spelling.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            RowState::Pending => "pending",
            RowState::Released => "released",
            RowState::Done => "done",
            RowState::Dead => "dead",
        }
    }

    /// Reads the column; an unknown value is an error naming it, never
    /// guessed (it was once read as `dead`, and a redelivery acknowledged
    /// unrun).
    pub(crate) fn parse(column: &str) -> Result<Self, UnknownState> {
        match column {
            "pending" => Ok(RowState::Pending),
            "released" => Ok(RowState::Released),
            "done" => Ok(RowState::Done),
            "dead" => Ok(RowState::Dead),
            unknown => Err(UnknownState(unknown.to_owned())),
        }
    }

    /// As a decode error of the row it was read from.
    pub(crate) fn decode(column: &str) -> Result<Self, sqlx::Error> {
        Self::parse(column).map_err(|unknown| sqlx::Error::Decode(unknown.into()))
    }
}

impl From<&ClaimState> for RowState {
    fn from(state: &ClaimState) -> Self {
        match state {
            ClaimState::Pending { .. } => RowState::Pending,
            ClaimState::Released => RowState::Released,
            ClaimState::Done => RowState::Done,
            ClaimState::Dead => RowState::Dead,
        }
    }
}

impl From<Ending> for RowState {
    /// A kept key stays `pending` for its payload.
    fn from(ending: Ending) -> Self {
        match ending {
            Ending::Released => RowState::Released,
            Ending::Kept => RowState::Pending,
            Ending::Dead => RowState::Dead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_reads_back_as_written() {
        for state in [
            RowState::Pending,
            RowState::Released,
            RowState::Done,
            RowState::Dead,
        ] {
            assert_eq!(RowState::parse(state.as_str()).ok(), Some(state));
        }
    }

    #[test]
    fn an_unknown_state_is_an_error_naming_it() {
        let unknown = RowState::parse("archived").expect_err("not a state");
        assert!(unknown.to_string().contains("\"archived\""), "{unknown}");
    }
}
