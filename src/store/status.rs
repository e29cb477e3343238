//! The states of jobs, datasets and runs: the values of their `status` and
//! `outcome` columns. Stored as text (the migrations' `CHECK`s list the same
//! names), shown as the same lowercase names in answers.

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

/// An enum stored as one of a fixed set of text values.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order the migrations list them.
            pub const ALL: &[Self] = &[$(Self::$variant,)+];

            /// The name stored in Postgres and shown to users.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// The value stored as `text`, if it names one.
            pub fn parse(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|value| value.as_str() == text)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                Self::parse(text)
                    .ok_or_else(|| format!("{text:?} is not a {}", stringify!($name)).into())
            }
        }
    };
}

text_enum! {
    /// Where a job is in its life. `queued` → `running` → one of the three
    /// final statuses; a lost worker's job goes back to `queued`.
    JobStatus {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl JobStatus {
    /// Whether the job has ended: it never leaves this status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

text_enum! {
    /// Where a dataset is in its life: visible while `ingesting`, usable once
    /// `ready`; `deleted` rows stay (without files) for the lineage of the
    /// jobs and models that used them.
    DatasetStatus {
        Ingesting = "ingesting",
        Ready = "ready",
        /// Written by earlier versions, whose failed ingests kept their row.
        Failed = "failed",
        Deleted = "deleted",
    }
}

text_enum! {
    /// How one attempt of a job (a run) ended.
    RunOutcome {
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
        /// Its worker lost the lease (vanished, shut down, or was overtaken).
        Lost = "lost",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        fn check<T>(all: &[T], as_str: fn(T) -> &'static str, parse: fn(&str) -> Option<T>)
        where
            T: Copy + PartialEq + std::fmt::Debug + serde::Serialize,
        {
            for &value in all {
                assert_eq!(parse(as_str(value)), Some(value));
                assert_eq!(serde_json::to_value(value).unwrap(), as_str(value));
            }
            assert_eq!(parse("Queued"), None);
        }
        check(JobStatus::ALL, JobStatus::as_str, JobStatus::parse);
        check(
            DatasetStatus::ALL,
            DatasetStatus::as_str,
            DatasetStatus::parse,
        );
        check(RunOutcome::ALL, RunOutcome::as_str, RunOutcome::parse);
    }

    #[test]
    fn only_final_job_statuses_are_terminal() {
        let terminal: Vec<&str> = JobStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(terminal, ["succeeded", "failed", "cancelled"]);
    }
}
