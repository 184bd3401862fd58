//! The pure decision, row by row: every training row (spec §1), every
//! retention row (spec §2), the geo/IP rules (spec §3) and the routing rules
//! (spec §4), plus property tests of the invariants that must hold for any
//! facts. Edition-2 rows and rules are named after their ids too (T2w, TZ,
//! route_6_purpose, route_5_zdr, route_7_eu_first...).
//!
//! No I/O: only `privacy_gateway::policy::decide` on hand-built facts.

use std::collections::BTreeSet;

use std::time::Duration;

use privacy_gateway::policy::{
    decide, Basis, Capability, CapabilitySet, Consents, Decision, PlanClass, PoolCatalog,
    PoolProfile, PoolSet, Product, ProductSet, RegionId, RequestFacts, Retention, RouteConstraint,
    SubprocessorSet, Training,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// The spec's pool table (spec §4), as a catalogue.
//
// Regions:        eu = RegionId(0), us = RegionId(1).
// Subprocessors:  azure = 0, gcp = 1, cerebras = 2, black-forest-labs = 3,
//                 brave = 4, e2b = 5.
// Pools (index = position in the catalogue, in the order of the spec table):
//   0 azure-sweden       azure              eu  chat, embeddings, fine_tuning, feedback, connector
//   1 gcp-ireland        gcp                eu  chat, embeddings, feedback, connector
//   2 gcp-us             gcp                us  chat, embeddings          priority 1
//   3 cerebras           cerebras           us  chat                      priority 1
//   4 black-forest-labs  black-forest-labs  us  image_generation          retains input 15 days
//   5 brave              brave              us  web_search
//   6 e2b                e2b                us  code_interpreter          chat only
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
    PoolProfile::new(subprocessor, region, caps(list))
}

/// The catalogue of the spec §4 table (indices documented above).
fn spec_catalog() -> PoolCatalog {
    use Capability::*;
    PoolCatalog::new(vec![
        pool(
            SP_AZURE,
            EU,
            &[Chat, Embeddings, FineTuning, Feedback, Connector],
        ),
        pool(SP_GCP, EU, &[Chat, Embeddings, Feedback, Connector]),
        PoolProfile {
            priority: 1,
            ..pool(SP_GCP, US, &[Chat, Embeddings])
        },
        PoolProfile {
            priority: 1,
            ..pool(SP_CEREBRAS, US, &[Chat])
        },
        PoolProfile {
            retains_input: Some(Duration::from_secs(15 * 86_400)),
            ..pool(SP_BFL, US, &[ImageGeneration])
        },
        pool(SP_BRAVE, US, &[WebSearch]),
        PoolProfile {
            products: ProductSet::only(Product::Chat),
            ..pool(SP_E2B, US, &[CodeInterpreter])
        },
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
// spec §1 Training
// ---------------------------------------------------------------------------

#[test]
fn t0_unknown_plan_is_denied_default_deny() {
    for product in [Product::Api, Product::Chat] {
        for capability in Capability::ALL {
            if matches!(capability, Capability::Connector | Capability::WebSearch) {
                continue; // T2, T2w would match first
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
fn t2w_web_search_is_denied_third_party_content() {
    for plan in ALL_PLANS {
        for consents in [no_consents(), opted_in()] {
            let d = run(
                plan.product(),
                Some(plan),
                consents,
                Capability::WebSearch,
                false,
            );
            assert_training(&d, Training::Denied, "2.3/third-party");
        }
    }
    // Precedence: T2w beats T5 (api free), T6 (team opt-in), T8-T11 (chat).
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        no_consents(),
        Capability::WebSearch,
        false,
    );
    assert_training(&d, Training::Denied, "2.3/third-party");
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::WebSearch,
        false,
    );
    assert_training(&d, Training::Denied, "2.3/third-party");
    // ... and T0: web search is never trained on, known plan or not.
    let d = run(
        Product::Chat,
        None,
        no_consents(),
        Capability::WebSearch,
        false,
    );
    assert_training(&d, Training::Denied, "2.3/third-party");
    // T1 and T2 still come first.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        restricted(),
        Capability::WebSearch,
        false,
    );
    assert_training(&d, Training::Denied, "8/limitation");
}

#[test]
fn t3_api_paid_is_denied_paid() {
    for capability in Capability::ALL {
        if matches!(capability, Capability::Connector | Capability::WebSearch) {
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

fn zdr() -> Consents {
    Consents {
        zdr: true,
        ..Consents::default()
    }
}

#[test]
fn tz_api_free_zdr_is_denied_zdr() {
    for capability in [
        Capability::Chat,
        Capability::Embeddings,
        Capability::Feedback,
        Capability::FineTuning,
    ] {
        let d = run(
            Product::Api,
            Some(PlanClass::ApiFree),
            zdr(),
            capability,
            false,
        );
        assert_training(&d, Training::Denied, "5/zdr");
    }
    // Precedence: T3 comes first for paid accounts, TZ beats T4 and T5.
    let d = run(
        Product::Api,
        Some(PlanClass::ApiPaid),
        zdr(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.2/paid");
    let zdr_objected = Consents {
        zdr: true,
        training_opt_out: true,
        ..Consents::default()
    };
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        zdr_objected,
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Denied, "5/zdr");
    // zdr is an api flag: it does not change a chat plan's training row.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        zdr(),
        Capability::Chat,
        false,
    );
    assert_training(&d, Training::Allowed, "3.4.3/default");
    // T2 and T2w still come first.
    let d = run(
        Product::Api,
        Some(PlanClass::ApiFree),
        zdr(),
        Capability::Connector,
        false,
    );
    assert_training(&d, Training::Denied, "3.4.4/third-party");
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
fn t6_an_objection_beats_a_team_opt_in() {
    // Edition 2: an objection (policy §8) beats an opt-in; T7 decides.
    let both = Consents {
        training_opt_in: true,
        training_opt_out: true,
        ..Consents::default()
    };
    for capability in [
        Capability::Chat,
        Capability::Feedback,
        Capability::Embeddings,
    ] {
        let d = run(
            Product::Chat,
            Some(PlanClass::ChatTeam),
            both,
            capability,
            false,
        );
        assert_training(&d, Training::Denied, "3.4.3/team");
    }
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
// spec §2 Retention
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
// spec §3 Geo / IP
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
// spec §4 Routing
// ---------------------------------------------------------------------------

const OPT_OUT: RouteConstraint = RouteConstraint::SubprocessorOptOut;
const RESIDENCY: RouteConstraint = RouteConstraint::Residency;
const PURPOSE: RouteConstraint = RouteConstraint::Purpose;
const ZDR: RouteConstraint = RouteConstraint::Zdr;

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
    assert!(d.route.removed.by(OPT_OUT).is_empty());
    assert!(d.route.removed.by(RESIDENCY).is_empty());
    assert!(d.route.removed.is_empty());
    // The single-capability pools.
    for (capability, only) in [
        (Capability::ImageGeneration, BLACK_FOREST_LABS),
        (Capability::WebSearch, BRAVE),
        (Capability::FineTuning, AZURE_SWEDEN),
    ] {
        let d = route_for(no_consents(), capability);
        assert_eq!(d.route.candidates, pools(&[only]), "{capability}");
    }
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        no_consents(),
        Capability::CodeInterpreter,
        false,
    );
    assert_eq!(d.route.candidates, pools(&[E2B]));
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
    assert_eq!(d.route.removed.by(OPT_OUT), pools(&[CEREBRAS]));
    assert!(d.route.removed.by(RESIDENCY).is_empty());
    // Opting out of gcp removes both gcp pools.
    let no_gcp = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_GCP]),
        ..Consents::default()
    };
    let d = route_for(no_gcp, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[AZURE_SWEDEN, CEREBRAS]));
    assert_eq!(d.route.removed.by(OPT_OUT), pools(&[GCP_IRELAND, GCP_US]));
}

#[test]
fn route_residency_eu_keeps_only_eu_pools() {
    let eu_only = Consents {
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_only, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[AZURE_SWEDEN, GCP_IRELAND]));
    assert_eq!(d.route.removed.by(RESIDENCY), pools(&[GCP_US, CEREBRAS]));
    assert!(d.route.removed.by(OPT_OUT).is_empty());
    // And `us` likewise.
    let us_only = Consents {
        residency: Some(US),
        ..Consents::default()
    };
    let d = route_for(us_only, Capability::Chat);
    assert_eq!(d.route.candidates, pools(&[GCP_US, CEREBRAS]));
    assert_eq!(
        d.route.removed.by(RESIDENCY),
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
    assert_eq!(d.route.removed.by(RESIDENCY), pools(&[BLACK_FOREST_LABS]));
    assert!(d.route.removed.by(OPT_OUT).is_empty());
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
    assert_eq!(d.route.removed.by(OPT_OUT), pools(&[CEREBRAS]));
    assert_eq!(d.route.removed.by(RESIDENCY), pools(&[GCP_US]));
    assert!(!d.route.removed.by(RESIDENCY).contains(CEREBRAS));
    // Opting out of an eu subprocessor under eu residency.
    let eu_no_azure = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_AZURE]),
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_no_azure, Capability::FineTuning);
    assert!(d.route.candidates.is_empty());
    assert_eq!(d.route.removed.by(OPT_OUT), pools(&[AZURE_SWEDEN]));
    assert!(d.route.removed.by(RESIDENCY).is_empty());
}

#[test]
fn route_6_purpose_code_interpreter_is_le_chat_only() {
    // "Providing our code interpreter feature on Le Chat" (policy §6).
    for plan in [PlanClass::ApiFree, PlanClass::ApiPaid] {
        let d = run(
            Product::Api,
            Some(plan),
            no_consents(),
            Capability::CodeInterpreter,
            false,
        );
        assert!(d.route.candidates.is_empty(), "{d:?}");
        assert_eq!(d.route.removed.by(PURPOSE), pools(&[E2B]));
        assert_eq!(
            d.route.removed.constraints().collect::<Vec<_>>(),
            [Basis::Purpose]
        );
    }
    for plan in [
        PlanClass::ChatIndividual,
        PlanClass::ChatTeam,
        PlanClass::ChatAnonymous,
    ] {
        let d = run(
            Product::Chat,
            Some(plan),
            no_consents(),
            Capability::CodeInterpreter,
            false,
        );
        assert_eq!(d.route.candidates, pools(&[E2B]));
        assert!(d.route.removed.is_empty());
    }
    // Purpose is applied first: an api account that also opted out of e2b
    // is refused for the purpose, the structural reason.
    let no_e2b = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_E2B]),
        ..Consents::default()
    };
    let d = route_for(no_e2b, Capability::CodeInterpreter);
    assert_eq!(d.route.removed.by(PURPOSE), pools(&[E2B]));
    assert!(d.route.removed.by(OPT_OUT).is_empty());
}

#[test]
fn route_5_zdr_never_goes_to_a_pool_that_keeps_input() {
    // Black Forest Labs stores Input for 15 days (policy §6).
    let d = route_for(zdr(), Capability::ImageGeneration);
    assert!(d.route.candidates.is_empty(), "{d:?}");
    assert_eq!(d.route.removed.by(ZDR), pools(&[BLACK_FOREST_LABS]));
    assert_eq!(
        d.route.removed.constraints().collect::<Vec<_>>(),
        [Basis::Zdr]
    );
    // Without zdr it goes there; other zdr traffic is untouched.
    let d = route_for(no_consents(), Capability::ImageGeneration);
    assert_eq!(d.route.candidates, pools(&[BLACK_FOREST_LABS]));
    let d = route_for(zdr(), Capability::Chat);
    assert_eq!(
        d.route.candidates,
        pools(&[AZURE_SWEDEN, GCP_IRELAND, GCP_US, CEREBRAS])
    );
    // Any zdr retention counts, a restricted api account's included (R0).
    let d = route_for(restricted(), Capability::ImageGeneration);
    assert_eq!(d.retention, Retention::Zdr);
    assert_eq!(d.route.removed.by(ZDR), pools(&[BLACK_FOREST_LABS]));
    // Fine-tuning files are kept until deleted (R1), so zdr does not apply.
    let d = route_for(zdr(), Capability::FineTuning);
    assert_eq!(d.retention, Retention::UntilDeleted);
    assert!(d.route.removed.by(ZDR).is_empty());
    // Chat has no zdr retention: a chat account's flag changes no route.
    let d = run(
        Product::Chat,
        Some(PlanClass::ChatIndividual),
        zdr(),
        Capability::ImageGeneration,
        false,
    );
    assert_eq!(d.route.candidates, pools(&[BLACK_FOREST_LABS]));
}

#[test]
fn route_7_eu_first_tiers_put_eu_pools_before_us_pools() {
    let catalog = spec_catalog();
    let d = route_for(no_consents(), Capability::Chat);
    let tiers: Vec<_> = d
        .route
        .tiers(&catalog)
        .map(|t| (t.priority, t.pools))
        .collect();
    assert_eq!(
        tiers,
        [
            (0, pools(&[AZURE_SWEDEN, GCP_IRELAND])),
            (1, pools(&[GCP_US, CEREBRAS]))
        ]
    );
    // Serving from the EU tier is the rule; from the US tier, an exception.
    for pool in [AZURE_SWEDEN, GCP_IRELAND] {
        let served = d.route.served_by(&catalog, pool);
        assert_eq!((served.tier, served.exception), (0, None));
    }
    for pool in [GCP_US, CEREBRAS] {
        let served = d.route.served_by(&catalog, pool);
        assert_eq!(
            (served.tier, served.exception),
            (1, Some(Basis::EuFirstException))
        );
        assert_eq!(
            served.exception.map(Basis::as_str),
            Some("7/eu-first-exception")
        );
    }
    // Tiers hold candidates only: an opt-out removes from its tier.
    let no_cerebras = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_CEREBRAS]),
        ..Consents::default()
    };
    let d = route_for(no_cerebras, Capability::Chat);
    let tiers: Vec<_> = d.route.tiers(&catalog).map(|t| t.pools).collect();
    assert_eq!(
        tiers,
        [pools(&[AZURE_SWEDEN, GCP_IRELAND]), pools(&[GCP_US])]
    );
}

#[test]
fn route_7_eu_first_exception_only_above_the_lowest_candidate_tier() {
    let catalog = spec_catalog();
    // A us-resident account has only the priority-1 pools: that is its lowest
    // tier, so serving from it is no exception.
    let us_only = Consents {
        residency: Some(US),
        ..Consents::default()
    };
    let d = route_for(us_only, Capability::Chat);
    assert_eq!(d.route.tiers(&catalog).count(), 1);
    for pool in [GCP_US, CEREBRAS] {
        assert_eq!(d.route.served_by(&catalog, pool).exception, None);
    }
    // Pools that are the only ones for their capability stay at 0.
    for capability in [
        Capability::ImageGeneration,
        Capability::WebSearch,
        Capability::FineTuning,
    ] {
        let d = route_for(no_consents(), capability);
        let tiers: Vec<_> = d.route.tiers(&catalog).collect();
        assert_eq!(tiers.len(), 1, "{capability}");
        assert_eq!(tiers[0].priority, 0, "{capability}");
    }
    // No candidates, no tiers.
    let eu_only = Consents {
        residency: Some(EU),
        ..Consents::default()
    };
    let d = route_for(eu_only, Capability::ImageGeneration);
    assert_eq!(d.route.tiers(&catalog).count(), 0);
}

#[test]
fn removed_pools_name_each_pool_once_under_its_first_constraint() {
    let eu_no_cerebras_zdr = Consents {
        subprocessor_opt_outs: subprocessors(&[SP_CEREBRAS]),
        residency: Some(EU),
        zdr: true,
        ..Consents::default()
    };
    let d = route_for(eu_no_cerebras_zdr, Capability::Chat);
    let named: Vec<(usize, &str)> = d
        .route
        .removed
        .pools()
        .map(|(i, b)| (i, b.as_str()))
        .collect();
    assert_eq!(named, [(CEREBRAS, "6/opt-out"), (GCP_US, "7/residency")]);
    assert_eq!(
        d.route
            .removed
            .constraints()
            .map(Basis::as_str)
            .collect::<Vec<_>>(),
        ["6/opt-out", "7/residency"]
    );
    assert_eq!(d.route.removed.all(), pools(&[GCP_US, CEREBRAS]));
}

// ---------------------------------------------------------------------------
// The version of the decision tables (part of x-privacy-policy-version)
// ---------------------------------------------------------------------------

/// Each released version of the decision tables with the fingerprint of what
/// `decide` answers under it. A change to the tables changes the fingerprint:
/// bump `policy::DECISION_TABLES` and add a line; never edit an old one.
const DECISION_TABLES_HISTORY: &[(&str, &str)] = &[(
    "e2",
    "1b5a857bf0aacae5aea3d433cd712f12f74d07f1d44e9d3b836842e25b620f35",
)];

/// SHA-256 over `decide`'s answer for every combination of facts, on the
/// spec catalogue and on the same pools without their edition-2 terms.
fn decision_tables_fingerprint() -> String {
    use sha2::{Digest, Sha256};
    let plain = PoolCatalog::new(
        (0..spec_catalog().len())
            .map(|i| {
                let p = spec_catalog().get(i).expect("pool").clone();
                PoolProfile::new(p.subprocessor, p.region, p.capabilities)
            })
            .collect(),
    );
    let opt_out_sets = [
        vec![],
        vec![SP_CEREBRAS],
        vec![SP_GCP],
        vec![SP_AZURE],
        vec![SP_BFL, SP_BRAVE, SP_E2B],
    ];
    let mut hash = Sha256::new();
    let mut out = Vec::with_capacity(64);
    for catalog in [spec_catalog(), plain] {
        for product in [Product::Api, Product::Chat] {
            for plan in std::iter::once(None).chain(ALL_PLANS.map(Some)) {
                for capability in Capability::ALL {
                    for gpc in [false, true] {
                        for bits in 0..32u8 {
                            for residency in [None, Some(EU), Some(US)] {
                                for opt_outs in &opt_out_sets {
                                    let consents = Consents {
                                        training_opt_out: bits & 1 != 0,
                                        training_opt_in: bits & 2 != 0,
                                        zdr: bits & 4 != 0,
                                        ip_personalization_opt_out: bits & 8 != 0,
                                        restricted: bits & 16 != 0,
                                        subprocessor_opt_outs: subprocessors(opt_outs),
                                        residency,
                                    };
                                    let facts = RequestFacts {
                                        product,
                                        plan,
                                        consents: &consents,
                                        capability,
                                        global_privacy_control: gpc,
                                    };
                                    let d = decide(&catalog, &facts);
                                    out.clear();
                                    for text in [
                                        d.training.as_str(),
                                        d.training_basis.as_str(),
                                        d.retention.as_str(),
                                        d.retention_basis.as_str(),
                                        d.geo.basis.as_str(),
                                    ] {
                                        out.extend_from_slice(text.as_bytes());
                                        out.push(0);
                                    }
                                    out.push(u8::from(d.geo.lookup));
                                    out.push(u8::from(d.forward_client_prefix));
                                    for t in d.route.tiers(&catalog) {
                                        out.extend(t.priority.to_le_bytes());
                                        out.extend(t.pools.iter().map(|i| i as u8));
                                        out.push(0xff);
                                    }
                                    for (i, basis) in d.route.removed.pools() {
                                        out.push(i as u8);
                                        out.extend_from_slice(basis.as_str().as_bytes());
                                    }
                                    hash.update((out.len() as u32).to_le_bytes());
                                    hash.update(&out);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    hex::encode(hash.finalize())
}

#[test]
fn decision_tables_version_names_what_decide_does() {
    let fingerprint = decision_tables_fingerprint();
    let version = privacy_gateway::policy::DECISION_TABLES;
    let known = DECISION_TABLES_HISTORY
        .iter()
        .find(|(_, f)| *f == fingerprint)
        .map(|(v, _)| *v);
    assert_eq!(
        known,
        Some(version),
        "decide() now answers differently from decision tables {version:?}: bump \
         policy::DECISION_TABLES (it is part of x-privacy-policy-version) and add \
         (new version, \"{fingerprint}\") to DECISION_TABLES_HISTORY"
    );
    let versions: BTreeSet<&str> = DECISION_TABLES_HISTORY.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions.len(),
        DECISION_TABLES_HISTORY.len(),
        "one line per version"
    );
    assert_eq!(
        DECISION_TABLES_HISTORY.last().map(|(v, _)| *v),
        Some(version)
    );
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

fn arb_products() -> impl Strategy<Value = ProductSet> {
    prop::sample::select(vec![
        ProductSet::only(Product::Api),
        ProductSet::only(Product::Chat),
        ProductSet::BOTH,
    ])
}

/// An arbitrary catalogue: up to 12 pools over the same subprocessors and
/// regions, with any products, input retention and priority.
fn arb_catalog() -> impl Strategy<Value = Vec<PoolProfile>> {
    prop::collection::vec(
        (
            (0usize..SUBPROCESSOR_COUNT, arb_region(), any::<u8>()),
            (arb_products(), any::<bool>(), 0u32..3),
        )
            .prop_map(
                |((subprocessor, region, cap_bits), (products, retains, priority))| {
                    let mut capabilities = CapabilitySet::default();
                    for (bit, c) in Capability::ALL.into_iter().enumerate() {
                        if cap_bits & (1 << bit) != 0 {
                            capabilities.insert(c);
                        }
                    }
                    PoolProfile {
                        products,
                        retains_input: retains.then_some(Duration::from_secs(86_400)),
                        priority,
                        ..PoolProfile::new(subprocessor, region, capabilities)
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
        || capability == Capability::WebSearch
        || plan.is_none()
        || plan == Some(PlanClass::ApiPaid)
        || (plan == Some(PlanClass::ApiFree) && (consents.training_opt_out || consents.zdr))
        || (plan == Some(PlanClass::ChatTeam)
            && (!consents.training_opt_in || consents.training_opt_out));
    if must_deny {
        prop_assert_eq!(d.training, Training::Denied, "decision: {:?}", d);
    }
    // A plan of the other product is treated as unknown.
    if plan.is_some_and(|p| p.product() != product) && !consents.restricted {
        prop_assert_eq!(d.training, Training::Denied);
        if !matches!(capability, Capability::Connector | Capability::WebSearch) {
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
        prop_assert!(pool.products.contains(product));
        prop_assert!(!consents.subprocessor_opt_outs.contains(pool.subprocessor));
        if let Some(region) = consents.residency {
            prop_assert_eq!(pool.region, region);
        }
        if d.retention == Retention::Zdr {
            prop_assert!(pool.retains_input.is_none());
        }
    }
    let removed = |c| {
        r.removed
            .by(c)
            .iter()
            .map(|i| catalog.get(i).expect("removed index"))
    };
    for pool in removed(PURPOSE) {
        prop_assert!(!pool.products.contains(product));
    }
    for pool in removed(OPT_OUT) {
        prop_assert!(consents.subprocessor_opt_outs.contains(pool.subprocessor));
    }
    for pool in removed(RESIDENCY) {
        prop_assert!(consents.residency.is_some_and(|reg| reg != pool.region));
    }
    for pool in removed(ZDR) {
        prop_assert!(d.retention == Retention::Zdr && pool.retains_input.is_some());
    }
    // The candidates and the removed sets partition the serving pools.
    let mut union = r.candidates;
    let mut count = r.candidates.len();
    for c in RouteConstraint::ALL {
        prop_assert_eq!(union.intersect(r.removed.by(c)), PoolSet::EMPTY);
        union = union.union(r.removed.by(c));
        count += r.removed.by(c).len();
    }
    prop_assert_eq!(union, serving);
    prop_assert_eq!(count, serving.len());
    prop_assert_eq!(
        r.removed.pools().count() + r.candidates.len(),
        serving.len()
    );
    // Tiers: ascending, disjoint, together exactly the candidates; serving
    // from any but the first is the EU-first exception.
    let tiers: Vec<_> = r.tiers(catalog).collect();
    prop_assert!(tiers.windows(2).all(|w| w[0].priority < w[1].priority));
    let mut tiered = PoolSet::EMPTY;
    for t in &tiers {
        prop_assert!(!t.pools.is_empty());
        prop_assert_eq!(tiered.intersect(t.pools), PoolSet::EMPTY);
        tiered = tiered.union(t.pools);
        for i in t.pools.iter() {
            let served = r.served_by(catalog, i);
            prop_assert_eq!(served.tier, t.priority);
            prop_assert_eq!(served.exception.is_some(), t.priority > tiers[0].priority);
        }
    }
    prop_assert_eq!(tiered, r.candidates);
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
