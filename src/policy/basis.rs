//! Basis ids: the short names that tie each decision to a sentence of the policy.

use std::fmt;

/// Why a decision came out as it did, as a closed set of ids.
///
/// The ids are part of the product: they are stamped upstream, written to the
/// audit log and shown by `explain`, so that a privacy team can trace any
/// request back to the section of the policy that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// §8: the account exercised its right to limitation.
    Limitation,
    /// §3.4.4: content from a connected third-party service is never trained on.
    ThirdParty,
    /// §3.4.2: paid La Plateforme input/output is never trained on.
    ApiPaid,
    /// §3.4.2: a free La Plateforme user objected.
    ApiObjection,
    /// §3.4.2: free La Plateforme input/output is trained on.
    ApiFree,
    /// §3.4.3: a Le Chat Team workspace opted in.
    TeamOptIn,
    /// §3.4.3: Le Chat Team is opted out by default, feedback included.
    Team,
    /// §3.4.3: a thumbs up/down rating is used even when training is opted out.
    Feedback,
    /// §3.4.3: an individual Le Chat user opted out.
    ChatOptOut,
    /// §3.4.3: an anonymous browser sent Global Privacy Control.
    Gpc,
    /// §3.4.3: individual and anonymous Le Chat use is trained on by default.
    ChatDefault,
    /// No rule matched (unknown product or plan): fail closed.
    DefaultDeny,
    /// §5: fine-tuning files are kept until the customer deletes them.
    FineTuning,
    /// §5: zero data retention is on.
    Zdr,
    /// §5: La Plateforme data is kept 30 days for abuse monitoring.
    Api30d,
    /// §5: anonymous Le Chat data lives as long as the conversation.
    ChatAnonymous,
    /// §5: Le Chat data of an account lives as long as the account.
    ChatAccount,
    /// §3.1: the country of the IP address may be used.
    IpCountry,
    /// §3.1: the user opted out of IP-based personalisation.
    IpOptOut,
    /// §6: the account opted out of this pool's subprocessor.
    SubprocessorOptOut,
    /// §7: the pool is outside the account's data residency.
    Residency,
}

impl Basis {
    /// The id as stamped in headers and logs, e.g. `3.4.2/paid`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Basis::Limitation => "8/limitation",
            Basis::ThirdParty => "3.4.4/third-party",
            Basis::ApiPaid => "3.4.2/paid",
            Basis::ApiObjection => "3.4.2/objection",
            Basis::ApiFree => "3.4.2/free",
            Basis::TeamOptIn => "3.4.3/team-opt-in",
            Basis::Team => "3.4.3/team",
            Basis::Feedback => "3.4.3/feedback",
            Basis::ChatOptOut => "3.4.3/opt-out",
            Basis::Gpc => "3.4.3/gpc",
            Basis::ChatDefault => "3.4.3/default",
            Basis::DefaultDeny => "default-deny",
            Basis::FineTuning => "5/fine-tuning",
            Basis::Zdr => "5/zdr",
            Basis::Api30d => "5/api-30d",
            Basis::ChatAnonymous => "5/chat-anonymous",
            Basis::ChatAccount => "5/chat-account",
            Basis::IpCountry => "3.1/ip-country",
            Basis::IpOptOut => "3.1/ip-opt-out",
            Basis::SubprocessorOptOut => "6/opt-out",
            Basis::Residency => "7/residency",
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
