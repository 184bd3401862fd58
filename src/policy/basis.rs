//! Basis ids: the short names that tie each decision to a sentence of the policy.
//!
//! In this crate "policy §N" is a section of the privacy policy
//! (`reference/privacy-policy-2025-02-06.md`) and "spec §N" a section of the
//! enforcement spec (`spec/enforcement.md`). Basis ids are numbered after the
//! policy's sections.

use std::fmt;

/// Why a decision came out as it did, as a closed set of ids.
///
/// The ids are part of the product: they are stamped upstream, written to the
/// audit log and shown by `explain`, so that a privacy team can trace any
/// request back to the section of the policy that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// Policy §8: the account exercised its right to limitation.
    Limitation,
    /// Policy §3.4.4: content from a connected third-party service is never trained on.
    ThirdParty,
    /// Policy §2.3: web search results are Third-Party Content, never trained on.
    ThirdPartyContent,
    /// Policy §3.4.2: paid La Plateforme input/output is never trained on.
    ApiPaid,
    /// Policy §3.4.2: a free La Plateforme user objected.
    ApiObjection,
    /// Policy §3.4.2: free La Plateforme input/output is trained on.
    ApiFree,
    /// Policy §3.4.3: a Le Chat Team workspace opted in (and did not object).
    TeamOptIn,
    /// Policy §3.4.3: Le Chat Team is opted out by default, feedback included.
    Team,
    /// Policy §3.4.3: a thumbs up/down rating is used even when training is opted out.
    Feedback,
    /// Policy §3.4.3: an individual Le Chat user opted out.
    ChatOptOut,
    /// Policy §3.4.3: an anonymous browser sent Global Privacy Control.
    Gpc,
    /// Policy §3.4.3: individual and anonymous Le Chat use is trained on by default.
    ChatDefault,
    /// No rule matched (unknown product or plan): fail closed.
    DefaultDeny,
    /// Policy §5: fine-tuning files are kept until the customer deletes them.
    FineTuning,
    /// Policy §5: zero data retention is on. Also a training basis (nothing
    /// kept, nothing to train on) and a routing constraint (never a pool that
    /// keeps input, policy §6).
    Zdr,
    /// Policy §5: La Plateforme data is kept 30 days for abuse monitoring.
    Api30d,
    /// Policy §5: anonymous Le Chat data lives as long as the conversation.
    ChatAnonymous,
    /// Policy §5: Le Chat data of an account lives as long as the account.
    ChatAccount,
    /// Policy §3.1: the country of the IP address may be used.
    IpCountry,
    /// Policy §3.1: the user opted out of IP-based personalisation.
    IpOptOut,
    /// Policy §6: the account opted out of this pool's subprocessor.
    SubprocessorOptOut,
    /// Policy §6: the subprocessor serves this capability for another product only.
    Purpose,
    /// Policy §7: the pool is outside the account's data residency.
    Residency,
    /// Policy §7: served by a non-EU tier because every EU candidate was down.
    EuFirstException,
}

impl Basis {
    /// Every basis id, in declaration order.
    pub const ALL: [Basis; 24] = [
        Basis::Limitation,
        Basis::ThirdParty,
        Basis::ThirdPartyContent,
        Basis::ApiPaid,
        Basis::ApiObjection,
        Basis::ApiFree,
        Basis::TeamOptIn,
        Basis::Team,
        Basis::Feedback,
        Basis::ChatOptOut,
        Basis::Gpc,
        Basis::ChatDefault,
        Basis::DefaultDeny,
        Basis::FineTuning,
        Basis::Zdr,
        Basis::Api30d,
        Basis::ChatAnonymous,
        Basis::ChatAccount,
        Basis::IpCountry,
        Basis::IpOptOut,
        Basis::SubprocessorOptOut,
        Basis::Purpose,
        Basis::Residency,
        Basis::EuFirstException,
    ];

    /// The id as stamped in headers and logs, e.g. `3.4.2/paid`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Basis::Limitation => "8/limitation",
            Basis::ThirdParty => "3.4.4/third-party",
            Basis::ThirdPartyContent => "2.3/third-party",
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
            Basis::Purpose => "6/purpose",
            Basis::Residency => "7/residency",
            Basis::EuFirstException => "7/eu-first-exception",
        }
    }
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct() {
        let ids: std::collections::BTreeSet<&str> = Basis::ALL.iter().map(|b| b.as_str()).collect();
        assert_eq!(ids.len(), Basis::ALL.len());
    }
}
