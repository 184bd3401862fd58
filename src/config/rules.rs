//! `rules.toml` -> plan names, capability routes, prefix lengths, shadow rules.

use std::collections::BTreeMap;

use http::Method;

use super::diagnostics::FileErrors;
use super::files::{PlansEntry, RouteEntry, RulesFile};
use super::snapshot::{PlanNames, ShadowRules};
use crate::capability::{CapabilityRoute, CapabilityRoutes};
use crate::client_ip::PrefixLengths;
use crate::policy::{Capability, CapabilitySet, PlanClass, Product};

/// Longest IPv4 prefix a client address may be truncated to (spec §3).
const MAX_IPV4_PREFIX: u8 = 24;
/// Longest IPv6 prefix a client address may be truncated to (spec §3).
const MAX_IPV6_PREFIX: u8 = 48;

/// The rules file, compiled.
pub(super) struct Rules {
    pub(super) prefix_lengths: PrefixLengths,
    pub(super) plans: PlanNames,
    pub(super) routes: CapabilityRoutes,
    pub(super) routed: CapabilitySet,
    pub(super) shadow: Option<ShadowRules>,
}

/// Plan names -> classes, on top of `base` (the enforced plans, for a shadow set).
fn compile_plans(entry: &PlansEntry, base: PlanNames, r: &mut FileErrors<'_>) -> PlanNames {
    let mut plans = base;
    let products: [(Product, &BTreeMap<String, toml::Spanned<String>>); 2] =
        [(Product::Api, &entry.api), (Product::Chat, &entry.chat)];
    for (product, names) in products {
        for (name, class) in names {
            if name == "anonymous" {
                r.at_span(
                    class.span(),
                    "`anonymous` is built in and cannot be redefined",
                );
                continue;
            }
            match class.get_ref().parse::<PlanClass>() {
                Ok(c) if c.product() == product => {
                    plans.insert(product, name.clone(), c);
                }
                Ok(_) => r.at_span(
                    class.span(),
                    format!(
                        "plan `{name}` of product `{product}` cannot have class `{}`",
                        class.get_ref()
                    ),
                ),
                Err(e) => r.at_span(class.span(), e),
            }
        }
    }

    plans
}

/// `[[route]]` tables -> compiled routes, and the capabilities they reach.
fn compile_routes(
    entries: &[toml::Spanned<RouteEntry>],
    r: &mut FileErrors<'_>,
) -> (CapabilityRoutes, CapabilitySet) {
    let mut routes = Vec::new();
    let mut routed = CapabilitySet::default();
    for entry in entries {
        let span = entry.span();
        let route = entry.get_ref();
        let method = match route
            .method
            .as_deref()
            .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
        {
            None => None,
            Some(Ok(m)) => Some(m),
            Some(Err(_)) => {
                r.at_span(
                    span,
                    format!(
                        "`{}` is not an HTTP method",
                        route.method.as_deref().unwrap_or("")
                    ),
                );
                continue;
            }
        };
        let capability = match route.capability.get_ref().parse::<Capability>() {
            Ok(c) => c,
            Err(e) => {
                r.at_span(route.capability.span(), e);
                continue;
            }
        };
        match CapabilityRoute::new(method, &route.path, capability) {
            Ok(compiled) => {
                routed.insert(capability);
                routes.push(compiled);
            }
            Err(e) => r.at_span(span, e),
        }
    }
    (CapabilityRoutes::new(routes), routed)
}

pub(super) fn compile_rules(file: &RulesFile, r: &mut FileErrors<'_>) -> Rules {
    let mut prefix_lengths = PrefixLengths::default();
    // The prefix must be a *part* of the address (policy §3.1, spec §3): a
    // longer one would forward a host's whole address.
    if let Some(v4) = &file.client_ip.ipv4_prefix {
        if *v4.get_ref() > MAX_IPV4_PREFIX {
            r.at_span(
                v4.span(),
                format!("ipv4_prefix must be 0 to {MAX_IPV4_PREFIX}: a longer prefix forwards the whole address"),
            );
        }
        prefix_lengths.ipv4 = *v4.get_ref();
    }
    if let Some(v6) = &file.client_ip.ipv6_prefix {
        if *v6.get_ref() > MAX_IPV6_PREFIX {
            r.at_span(
                v6.span(),
                format!("ipv6_prefix must be 0 to {MAX_IPV6_PREFIX}: a longer prefix forwards a site's whole address"),
            );
        }
        prefix_lengths.ipv6 = *v6.get_ref();
    }

    let plans = compile_plans(&file.plans, PlanNames::default(), r);
    let (routes, routed) = compile_routes(&file.routes, r);
    let shadow = file.shadow.as_ref().map(|shadow| ShadowRules {
        name: shadow.name.clone(),
        plans: compile_plans(&shadow.plans, plans.clone(), r),
        routes: shadow
            .routes
            .as_ref()
            .map(|routes| compile_routes(routes, r).0),
    });
    Rules {
        prefix_lengths,
        plans,
        routes,
        routed,
        shadow,
    }
}
