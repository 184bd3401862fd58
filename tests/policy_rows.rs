//! The pure decision, row by row: every training row (spec §1), every
//! retention row (§2), the geo/IP rules (§3) and the routing rules (§4), plus
//! property tests of the invariants that must hold for any facts.
//!
//! No I/O: only `privacy_gateway::policy::decide` on hand-built facts.

use std::collections::BTreeSet;

use privacy_gateway::policy::{
    decide, Capability, CapabilitySet, Consents, Decision, PlanClass, PoolCatalog, PoolProfile,
    PoolSet, Product, RegionId, RequestFacts, Retention, SubprocessorSet, Training,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The spec's pool table (§4), as a catalogue.
//
// Regions:        eu = RegionId(0), us = RegionId(1).
// Subprocessors:  azure = 0, gcp = 1, cerebras = 2, black-forest-labs = 3,
//                 brave = 4, e2b = 5.
// Pools (index = position in the catalogue, in the order of the spec table):
//   0 azure-sweden       azure              eu  chat, embeddings, fine_tuning, feedback, connector
//   1 gcp-ireland        gcp                eu  chat, embeddings, feedback, connector
//   2 gcp-us             gcp                us  chat, embeddings
//   3 cerebras           cerebras           us  chat
//   4 black-forest-labs  black-forest-labs  us  image_generation
//   5 brave              brave              us  web_search
//   6 e2b                e2b                us  code_interpreter
// ---------------------------------------------------------------------------

const EU: RegionId = RegionId(0);
const US: RegionId = RegionId(1);

const SP_AZURE: usize = 0;
const SP_GCP: usize = 1;
const SP_CEREBRAS: usize = 2;
const SP_BFL: usize = 3;
const SP_BRAVE: usize = 4;
const SP_E2B: usize = 5;
/// Subprocessor indices the spec catalogue uses (0..=5).
const SUBPROCESSOR_COUNT: usize = 6;

const AZURE_SWEDEN: usize = 0;
const GCP_IRELAND: usize = 1;
const GCP_US: usize = 2;
const CEREBRAS: usize = 3;
const BLACK_FOREST_LABS: usize = 4;
const BRAVE: usize = 5;
const E2B: usize = 6;

fn caps(list: &[Capability]) -> CapabilitySet {
    let mut set = CapabilitySet::default();
    for &c in list {
        set.insert(c);
    }
    set
}

fn pool(subprocessor: usize, region: RegionId, list: &[Capability]) -> PoolProfile {
    PoolProfile {
        subprocessor,
        region,
        capabilities: caps(list),
    }
}

/// The catalogue of the spec's §4 table (indices documented above).
fn spec_catalog() -> PoolCatalog {
    use Capability::*;
    PoolCatalog::new(vec![
        pool(
            SP_AZURE,
            EU,
            &[Chat, Embeddings, FineTuning, Feedback, Connector],
        ),
        pool(SP_GCP, EU, &[Chat, Embeddings, Feedback, Connector]),
        pool(SP_GCP, US, &[Chat, Embeddings]),
        pool(SP_CEREBRAS, US, &[Chat]),
        pool(SP_BFL, US, &[ImageGeneration]),
        pool(SP_BRAVE, US, &[WebSearch]),
        pool(SP_E2B, US, &[CodeInterpreter]),
    ])
}

fn pools(indices: &[usize]) -> PoolSet {
    let mut set = PoolSet::EMPTY;
    for &i in indices {
        set.insert(i);
    }
    set
}

fn subprocessors(indices: &[usize]) -> SubprocessorSet {
    let mut set = SubprocessorSet::EMPTY;
    for &i in indices {
        set.insert(i);
    }
    set
}

/// Decides on the spec catalogue.
fn run(
    product: Product,
    plan: Option<PlanClass>,
    consents: Consents,
    capability: Capability,
    gpc: bool,
) -> Decision {
    let facts = RequestFacts {
        product,
        plan,
        consents: &consents,
        capability,
        global_privacy_control: gpc,
    };
    decide(&spec_catalog(), &facts)
}

fn no_consents() -> Consents {
    Consents::default()
}

fn restricted() -> Consents {
    Consents {
        restricted: true,
        ..Consents::default()
    }
}

fn opted_out() -> Consents {
    Consents {
        training_opt_out: true,
        ..Consents::default()
    }
}

fn opted_in() -> Consents {
    Consents {
        training_opt_in: true,
        ..Consents::default()
    }
}

fn assert_training(d: &Decision, training: Training, basis: &str) {
    assert_eq!(d.training, training, "training, decision: {d:?}");
    assert_eq!(
        d.training_basis.as_str(),
        basis,
        "training basis, decision: {d:?}"
    );
}

fn assert_retention(d: &Decision, retention: Retention, basis: &str) {
    assert_eq!(d.retention, retention, "retention, decision: {d:?}");
    assert_eq!(
        d.retention_basis.as_str(),
        basis,
        "retention basis, decision: {d:?}"
    );
}

const ALL_PLANS: [PlanClass; 5] = [
    PlanClass::ApiFree,
    PlanClass::ApiPaid,
    PlanClass::ChatIndividual,
    PlanClass::ChatTeam,
    PlanClass::ChatAnonymous,
];

// ---------------------------------------------------------------------------
// §1 Training
// ---------------------------------------------------------------------------

#[test]
fn t0_unknown_plan_is_denied_default_deny() {
    for product in [Product::Api, Product::Chat] {
        for capability in Capability::ALL {
            if capability == Capability::Connector {
                continue; // T2 would match first
            }
            let d = run(product, None, no_consents(), capability, false);
            assert_training(&d, Training::Denied, "default-deny");
            // Flags that would allow training elsewhere do not help.
            let d = run(product, None, opted_in(), capability, false);
            assert_training(&d, Training::Denied, "default-deny");
        }
    }
    // A plan class of the other product is no plan at all for this product.
    for plan in ALL_PLANS {
        let other = match plan.product() {
            Product::Api => Product::Chat,
            Product::Chat => Product::Api,
        };
        for consents in [no_consents(), opted_in(), opted_out()] {
            let d = run(other, Some(plan), consents, Capability::Chat, false);
            assert_training(&d, Training::Denied, "default-deny");
        }
    }
    let d = run(
        Product::Chat,
        Some(PlanClass::ApiPaid),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "default-deny");
    let d = run(
        Product::Api,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "default-deny");
}

#[test]
fn t1_restricted_is_denied_limitation() {
    for plan in ALL_PLANS {
        let d = run(
            plan.product(),
            Some(plan),
            restricted(),
            Capability::Chat,
            false,
        );
        assert_training(&d, Training::Denied, "8/limitation");
    }
    // Precedence: T1 beats T2 (connector) and T5 (api free, allowed).
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        restricted(),
        Capability::Connector,
        false,
    );
    assert_training(&d, Training::Denied, "8/limitation");
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        restricted(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "8/limitation");
    // ... and T6 (team opt-in) and T8 (feedback).
    let team_opt_in_restricted = Consents {
        training_opt_in: true,
        restricted: true,
        ..Consents::default()
    };
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        team_opt_in_restricted,
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "8/limitation");
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        restricted(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Denied, "8/limitation");
    // ... and T0 (unknown plan).
    let d = run(Product::Api, None, restricted(), Capability::Chat, false);
    assert_training(&d, Training::Denied, "8/limitation");
}

#[test]
fn t2_connector_is_denied_third_party() {
    for plan in ALL_PLANS {
        let d = run(
            plan.product(),
            Some(plan),
            no_consents(),
            Capability::Connector,
            false,
        );
        assert_training(&d, Training::Denied, "3.4.4/third-party");
    }
    // Precedence: T2 beats T5 (api free), T6 (team opt-in), T11 (chat default).
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        no_consents(),
        Capability::Connector,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.4/third-party");
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        opted_in(),
        Capability::Connector,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.4/third-party");
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Connector,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.4/third-party");
}

#[test]
fn t3_api_paid_is_denied_paid() {
    for capability in Capability::ALL {
        if capability == Capability::Connector {
            continue;
        }
        let d = run(
            Product::Api,
            Some(PlanClass::ApiPaid),
            no_consents(),
            capability,
            false,
        );
        assert_training(&d, Training::Denied, "3.4.2/paid");
    }
    // An opt-in flag does not turn paid training on.
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        opted_in(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.2/paid");
}

#[test]
fn t4_api_free_objection_is_denied_objection() {
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        opted_out(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.2/objection");
    // Precedence: T4 beats T5 for every capability but connector (T2).
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        opted_out(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.2/objection");
}

#[test]
fn t5_api_free_is_allowed_free() {
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.2/free");
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        no_consents(),
        Capability::Embeddings,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.2/free");
}

#[test]
fn t6_chat_team_opt_in_is_allowed_team_opt_in() {
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        opted_in(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/team-opt-in");
    // Opt-in covers feedback too (T6 comes before T7).
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        opted_in(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/team-opt-in");
}

#[test]
fn t7_chat_team_is_denied_team_feedback_included() {
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.3/team");
    // Precedence: T7 beats T8, a team's feedback is not used.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatTeam),
        no_consents(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.3/team");
}

#[test]
fn t8_chat_individual_feedback_is_allowed_feedback() {
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/feedback");
    // Precedence: T8 beats T9, a rating is used even when opted out.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        opted_out(),
        Capability::Feedback,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/feedback");
}

#[test]
fn t9_chat_individual_opt_out_is_denied_opt_out() {
    for capability in [Capability::Chat, Capability::Embeddings] {
        let d = run(
            Product::Chat,
            Some(PlanClass::ChatIndividual),
            opted_out(),
            capability,
            false,
        );
        assert_training(&d, Training::Denied, "3.4.3/opt-out");
    }
    // Precedence: T9 beats T11.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/default");
}

#[test]
fn t10_chat_anonymous_gpc_is_denied_gpc() {
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatAnonymous),
        no_consents(),
        Capability::Chat,
        true,
    );
    assert_training(&d, Training::Denied, "3.4.3/gpc");
    // Precedence: T10 beats T11; without the signal the default applies.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatAnonymous),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/default");
}

#[test]
fn t11_chat_individual_and_anonymous_are_allowed_default() {
    for plan in [PlanClass::ChatIndividual, PlanClass::ChatAnonymous] {
        let d = run(
            Product::Chat,
            Some(plan),
            no_consents(),
            Capability::Chat,
            false,
        );
        assert_training(&d, Training::Allowed, "3.4.3/default");
    }
    // GPC only matters for anonymous traffic; an account's flags decide.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Chat,
        true,
    );
    assert_training(&d, Training::Allowed, "3.4.3/default");
}

// ---------------------------------------------------------------------------
// §2 Retention
// ---------------------------------------------------------------------------

#[test]
fn t0_unknown_plan_gets_the_most_protective_retention() {
    // Spec §8: when no decision can be made, the shortest retention the product allows.
    for capability in Capability::ALL {
        let d = run(Product::Api, None, no_consents(), capability, false);
        assert_retention(&d, Retention::Zdr, "default-deny");
        let d = run(Product::Chat, None, no_consents(), capability, false);
        assert_retention(&d, Retention::Conversation, "default-deny");
    }
    let d = run(
        Product::Chat,
        Some(PlanClass::ApiPaid),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_retention(&d, Retention::Conversation, "default-deny");
    // R0 still comes first.
    let d = run(Product::Api, None, restricted(), Capability::Chat, false);
    assert_retention(&d, Retention::Zdr, "8/limitation");
}

#[test]
fn r0_restricted_is_zdr_for_api_conversation_for_chat_limitation() {
    for plan in [PlanClass::ApiFree, PlanClass::ApiPaid] {
        let d = run(
            Product::Api,
            Some(plan),
            restricted(),
            Capability::Chat,
            false,
        );
        assert_retention(&d, Retention::Zdr, "8/limitation");
    }
    for plan in [
        PlanClass::ChatIndividual,
        PlanClass::ChatTeam,
        PlanClass::ChatAnonymous,
    ] {
        let d = run(
            Product::Chat,
            Some(plan),
            restricted(),
            Capability::Chat,
            false,
        );
        assert_retention(&d, Retention::Conversation, "8/limitation");
    }
    // Precedence: R0 beats R1 (fine_tuning) and R2 (zdr) for api.
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        restricted(),
        Capability::FineTuning,
        false,
    );
    assert_retention(&d, Retention::Zdr, "8/limitation");
    let restricted_zdr = Consents {
        zdr: true,
        restricted: true,
        ..Consents::default()
    };
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        restricted_zdr,
        Capability::Chat,
        false,
    );
    assert_retention(&d, Retention::Zdr, "8/limitation");
}

#[test]
fn r1_api_fine_tuning_is_until_deleted_fine_tuning() {
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        no_consents(),
        Capability::FineTuning,
        false,
    );
    assert_retention(&d, Retention::UntilDeleted, "5/fine-tuning");
    // Precedence: R1 beats R2, fine-tuning files are kept under ZDR too.
    let zdr = Consents {
        zdr: true,
        ..Consents::default()
    };
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        zdr,
        Capability::FineTuning,
        false,
    );
    assert_retention(&d, Retention::UntilDeleted, "5/fine-tuning");
}

#[test]
fn r2_api_zdr_is_zdr() {
    let zdr = Consents {
        zdr: true,
        ..Consents::default()
    };
    for plan in [PlanClass::ApiFree, PlanClass::ApiPaid] {
        for capability in [Capability::Chat, Capability::Embeddings] {
            let d = run(Product::Api, Some(plan), zdr, capability, false);
            assert_retention(&d, Retention::Zdr, "5/zdr");
        }
    }
    // Precedence: R2 beats R3.
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        no_consents(),
        Capability::Chat,
        false,
    );
    assert_retention(&d, Retention::Days30, "5/api-30d");
}

#[test]
fn r3_api_is_30d() {
    for plan in [PlanClass::ApiFree, PlanClass::ApiPaid] {
        for capability in [
            Capability::Chat,
            Capability::Embeddings,
            Capability::Feedback,
        ] {
            let d = run(Product::Api, Some(plan), no_consents(), capability, false);
            assert_retention(&d, Retention::Days30, "5/api-30d");
        }
    }
}

#[test]
fn r4_chat_anonymous_is_conversation() {
    for gpc in [false, true] {
        let d = run(
            Product::Chat,
            Some(PlanClass::ChatAnonymous),
            no_consents(),
            Capability::Chat,
            gpc,
        );
        assert_retention(&d, Retention::Conversation, "5/chat-anonymous");
    }
    // ZDR is an api flag: it does not change chat retention (R2 is api only).
    let zdr = Consents {
        zdr: true,
        ..Consents::default()
    };
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatAnonymous),
        zdr,
        Capability::Chat,
        false,
    );
    assert_retention(&d, Retention::Conversation, "5/chat-anonymous");
}

#[test]
fn r5_chat_account_is_account_lifetime() {
    for plan in [PlanClass::ChatIndividual, PlanClass::ChatTeam] {
        let d = run(
            Product::Chat,
            Some(plan),
            no_consents(),
            Capability::Chat,
            false,
        );
        assert_retention(&d, Retention::AccountLifetime, "5/chat-account");
    }
    // Fine-tuning on chat is not R1 (R1 is api only).
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::FineTuning,
        false,
    );
    assert_retention(&d, Retention::AccountLifetime, "5/chat-account");
}

// ---------------------------------------------------------------------------
// §3 Geo / IP
// ---------------------------------------------------------------------------

#[test]
fn geo_lookup_allowed_by_default_ip_country() {
    for plan in ALL_PLANS {
        let d = run(
            plan.product(),
            Some(plan),
            no_consents(),
            Capability::Chat,
            false,
        );
        assert!(d.geo.lookup, "{d:?}");
        assert_eq!(d.geo.basis.as_str(), "3.1/ip-country");
        assert!(d.forward_client_prefix, "{d:?}");
    }
    // GPC from a browser with an account does not skip the lookup.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::Chat,
        true,
    );
    assert!(d.geo.lookup);
    assert_eq!(d.geo.basis.as_str(), "3.1/ip-country");
}

#[test]
fn geo_skipped_under_ip_personalization_opt_out() {
    let no_ip = Consents {
        ip_personalization_opt_out: true,
        ..Consents::default()
    };
    for plan in ALL_PLANS {
        let d = run(plan.product(), Some(plan), no_ip, Capability::Chat, false);
        assert!(!d.geo.lookup, "{d:?}");
        assert_eq!(d.geo.basis.as_str(), "3.1/ip-opt-out");
        assert!(!d.forward_client_prefix, "{d:?}");
    }
}

#[test]
fn geo_skipped_for_anonymous_with_gpc() {
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatAnonymous),
        no_consents(),
        Capability::Chat,
        true,
    );
    assert!(!d.geo.lookup, "{d:?}");
    assert_eq!(d.geo.basis.as_str(), "3.1/ip-opt-out");
    // GPC skips the lookup but the truncated prefix is still forwarded.
    assert!(d.forward_client_prefix, "{d:?}");
}

#[test]
fn geo_skipped_when_restricted_limitation() {
    for plan in ALL_PLANS {
        let d = run(
            plan.product(),
            Some(plan),
            restricted(),
            Capability::Chat,
            false,
        );
        assert!(!d.geo.lookup, "{d:?}");
        assert_eq!(d.geo.basis.as_str(), "8/limitation");
        // Limitation alone does not stop the truncated prefix.
        assert!(d.forward_client_prefix, "{d:?}");
    }
    // Limitation is named even when the account also opted out of IP use.
    let both = Consents {
        restricted: true,
        ip_personalization_opt_out: true,
        ..Consents::default()
    };
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        both,
        Capability::Chat,
        false,
    );
    assert!(!d.geo.lookup);
    assert_eq!(d.geo.basis.as_str(), "8/limitation");
    assert!(!d.forward_client_prefix);
}

#[test]
fn forward_client_prefix_false_only_under_ip_personalization_opt_out() {
    let flags = |bits: u8| Consents {
        training_opt_out: bits & 1 != 0,
        training_opt_in: bits & 2 != 0,
        zdr: bits & 4 != 0,
        ip_personalization_opt_out: bits & 8 != 0,
        restricted: bits & 16 != 0,
        ..Consents::default()
    };
    for bits in 0..32u8 {
        for plan in ALL_PLANS {
            for gpc in [false, true] {
                let consents = flags(bits);
                let d = run(plan.product(), Some(plan), consents, Capability::Chat, gpc);
                assert_eq!(
                    d.forward_client_prefix, !consents.ip_personalization_opt_out,
                    "{consents:?} {plan:?} gpc={gpc}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// §4 Routing
// ---------------------------------------------------------------------------

fn route_for(consents: Consents, capability: Capability) -> Decision {
    run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        consents,
        capability,
        false,
    )
}

#[test]
fn route_chat_candidates_are_the_four_chat_pools() {
    let d = route_for(no_consents(), Capability::Chat);
    assert_eq!(
        d.route.candidates,
        pools(&[AZURE_SWEDEN, GCP_IRELAND, GCP_US, CEREBRAS])
    );
    assert!(d.route.removed_opt_out.is_empty());
    assert!(d.route.removed_residency.is_empty());
    // The single-capability pools.
    for (capability, only) in [
        (Capability::ImageGeneration, BLACK_FOREST_LABS),
        (Capability::WebSearch, BRAVE),
        (Capability::CodeInterpreter, E2B),
        (Capability::FineTuning, AZURE_SWEDEN),
    ] {
        let d = route_for(no_consents(), capability);
        assert_eq!(d.route.candidates, pools(&[only]), "{capability}");
    }
}

#[test]
fn route_cerebras_opt_out_removes_exactly_cerebras() {
    let no_cerebras = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_CEREBRAS]),
        ..Consents::default()
    };
    let d = route_for(no_cerebras, Capability::Chat);
    assert_eq!(
        d.route.candidates,
        pools(&[AZURE_SWEDEN, GCP_IRELAND, GCP_US])
    );
    assert_eq!(d.route.removed_opt_out, pools(&[CEREBRAS]));
    assert!(d.route.removed_residency.is_empty());
    // Opting out of gcp removes both gcp pools.
    let no_gcp = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_GCP]),
        ..Consents::default()
    };
    let d = route_for(no_gcp, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[AZURE_SWEDEN, CEREBRAS]));
    assert_eq!(d.route.removed_opt_out, pools(&[GCP_IRELAND, GCP_US]));
}

#[test]
fn route_residency_eu_keeps_only_eu_pools() {
    let eu_only = Consents {
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_only, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[AZURE_SWEDEN, GCP_IRELAND]));
    assert_eq!(d.route.removed_residency, pools(&[GCP_US, CEREBRAS]));
    assert!(d.route.removed_opt_out.is_empty());
    // And `us` likewise.
    let us_only = Consents {
        residency: Some(US),
        ..Consents::default()
    };
    let d = route_for(us_only, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[GCP_US, CEREBRAS]));
    assert_eq!(
        d.route.removed_residency,
        pools(&[AZURE_SWEDEN, GCP_IRELAND])
    );
}

#[test]
fn route_residency_eu_image_generation_leaves_no_candidate() {
    let eu_only = Consents {
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_only, Capability::ImageGeneration);
    assert!(d.route.candidates.is_empty(), "{d:?}");
    assert_eq!(d.route.removed_residency, pools(&[BLACK_FOREST_LABS]));
    assert!(d.route.removed_opt_out.is_empty());
}

#[test]
fn route_pool_removed_by_opt_out_is_not_counted_under_residency() {
    let eu_no_cerebras = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_CEREBRAS]),
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_no_cerebras, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[AZURE_SWEDEN, GCP_IRELAND]));
    assert_eq!(d.route.removed_opt_out, pools(&[CEREBRAS]));
    assert_eq!(d.route.removed_residency, pools(&[GCP_US]));
    assert!(!d.route.removed_residency.contains(CEREBRAS));
    // Opting out of an eu subprocessor under eu residency.
    let eu_no_azure = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_AZURE]),
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_no_azure, Capability::FineTuning);
    assert!(d.route.candidates.is_empty());
    assert_eq!(d.route.removed_opt_out, pools(&[AZURE_SWEDEN]));
    assert!(d.route.removed_residency.is_empty());
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn arb_region() -> impl Strategy<Value = RegionId> {
    prop_oneof![Just(EU), Just(US)]
}

fn arb_subprocessor_set() -> impl Strategy<Value = SubprocessorSet> {
    // Indices beyond the catalogue's (6, 7) stand for unknown subprocessors.
    prop::collection::btree_set(0usize..SUBPROCESSOR_COUNT + 2, 0..=SUBPROCESSOR_COUNT + 2)
        .prop_map(|set: BTreeSet<usize>| {
            let mut s = SubprocessorSet::EMPTY;
            for i in set {
                s.insert(i);
            }
            s
        })
}

fn arb_consents() -> impl Strategy<Value = Consents> {
    (
        any::<[bool; 5]>(),
        arb_subprocessor_set(),
        prop::option::of(arb_region()),
    )
        .prop_map(|(flags, subprocessor_opt_outs, residency)| Consents {
            training_opt_out: flags[0],
            training_opt_in: flags[1],
            zdr: flags[2],
            ip_personalization_opt_out: flags[3],
            restricted: flags[4],
            subprocessor_opt_outs,
            residency,
        })
}

fn arb_plan() -> impl Strategy<Value = Option<PlanClass>> {
    prop::option::of(prop::sample::select(ALL_PLANS.to_vec()))
}

fn arb_product() -> impl Strategy<Value = Product> {
    prop_oneof![Just(Product::Api), Just(Product::Chat)]
}

fn arb_capability() -> impl Strategy<Value = Capability> {
    prop::sample::select(Capability::ALL.to_vec())
}

/// An arbitrary catalogue: up to 12 pools over the same subprocessors and regions.
fn arb_catalog() -> impl Strategy<Value = Vec<PoolProfile>> {
    prop::collection::vec(
        (0usize..SUBPROCESSOR_COUNT, arb_region(), any::<u8>()).prop_map(
            |(subprocessor, region, cap_bits)| {
                let mut capabilities = CapabilitySet::default();
                for (bit, c) in Capability::ALL.into_iter().enumerate() {
                    if cap_bits & (1 << bit) != 0 {
                        capabilities.insert(c);
                    }
                }
                PoolProfile {
                    subprocessor,
                    region,
                    capabilities,
                }
            },
        ),
        0..12,
    )
}

fn check_invariants(
    catalog: &PoolCatalog,
    product: Product,
    plan: Option<PlanClass>,
    consents: &Consents,
    capability: Capability,
    gpc: bool,
) -> Result<(), TestCaseError> {
    let facts = RequestFacts {
        product,
        plan,
        consents,
        capability,
        global_privacy_control: gpc,
    };
    let d = decide(catalog, &facts);

    // Deterministic.
    prop_assert_eq!(d, decide(catalog, &facts));

    // Training is never allowed when ...
    let must_deny = consents.restricted
        || capability == Capability::Connector
        || plan.is_none()
        || plan == Some(PlanClass::ApiPaid)
        || (plan == Some(PlanClass::ApiFree) && consents.training_opt_out)
        || (plan == Some(PlanClass::ChatTeam) && !consents.training_opt_in);
    if must_deny {
        prop_assert_eq!(d.training, Training::Denied, "decision: {:?}", d);
    }
    // A plan of the other product is treated as unknown.
    if plan.is_some_and(|p| p.product() != product) && !consents.restricted {
        prop_assert_eq!(d.training, Training::Denied);
        if capability != Capability::Connector {
            prop_assert_eq!(d.training_basis.as_str(), "default-deny");
        }
    }

    // Restricted: shortest retention, no lookup.
    if consents.restricted {
        prop_assert!(
            matches!(d.retention, Retention::Zdr | Retention::Conversation),
            "decision: {:?}",
            d
        );
        prop_assert_eq!(d.retention_basis.as_str(), "8/limitation");
        prop_assert_eq!(d.training_basis.as_str(), "8/limitation");
        prop_assert!(!d.geo.lookup);
    }
    if consents.ip_personalization_opt_out {
        prop_assert!(!d.geo.lookup);
    }
    prop_assert_eq!(
        d.forward_client_prefix,
        !consents.ip_personalization_opt_out
    );

    // Routing.
    let serving = catalog.serving(capability);
    let r = d.route;
    prop_assert_eq!(r.candidates.without(serving), PoolSet::EMPTY);
    for i in r.candidates.iter() {
        let pool = catalog.get(i).expect("candidate index is in the catalogue");
        prop_assert!(pool.capabilities.contains(capability));
        prop_assert!(!consents.subprocessor_opt_outs.contains(pool.subprocessor));
        if let Some(region) = consents.residency {
            prop_assert_eq!(pool.region, region);
        }
    }
    for i in r.removed_opt_out.iter() {
        let pool = catalog.get(i).expect("removed index is in the catalogue");
        prop_assert!(consents.subprocessor_opt_outs.contains(pool.subprocessor));
    }
    for i in r.removed_residency.iter() {
        let pool = catalog.get(i).expect("removed index is in the catalogue");
        prop_assert!(consents.residency.is_some_and(|reg| reg != pool.region));
    }
    // Partition of the serving pools.
    prop_assert_eq!(r.candidates.intersect(r.removed_opt_out), PoolSet::EMPTY);
    prop_assert_eq!(r.candidates.intersect(r.removed_residency), PoolSet::EMPTY);
    prop_assert_eq!(
        r.removed_opt_out.intersect(r.removed_residency),
        PoolSet::EMPTY
    );
    let mut union = r.candidates;
    for i in r.removed_opt_out.iter().chain(r.removed_residency.iter()) {
        union.insert(i);
    }
    prop_assert_eq!(union, serving);
    prop_assert_eq!(
        r.candidates.len() + r.removed_opt_out.len() + r.removed_residency.len(),
        serving.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn prop_invariants_on_spec_catalog(
        product in arb_product(),
        plan in arb_plan(),
        consents in arb_consents(),
        capability in arb_capability(),
        gpc in any::<bool>(),
    ) {
        check_invariants(&spec_catalog(), product, plan, &consents, capability, gpc)?;
    }

    #[test]
    fn prop_invariants_on_arbitrary_catalog(
        pools in arb_catalog(),
        product in arb_product(),
        plan in arb_plan(),
        consents in arb_consents(),
        capability in arb_capability(),
        gpc in any::<bool>(),
    ) {
        check_invariants(&PoolCatalog::new(pools), product, plan, &consents, capability, gpc)?;
    }
}
