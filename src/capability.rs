//! Method + path -> capability: which kind of model work a request asks for.

use http::Method;

use crate::policy::Capability;

/// One segment of a path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Must equal this text.
    Literal(Box<str>),
    /// `{name}`: any one non-empty segment.
    Any,
}

/// A `[[route]]` of the rules file, compiled.
#[derive(Clone, Debug)]
pub struct CapabilityRoute {
    method: Option<Method>,
    segments: Vec<Segment>,
    capability: Capability,
}

impl CapabilityRoute {
    /// Compiles a pattern such as `/v1/connectors/{name}/content`.
    pub fn new(
        method: Option<Method>,
        pattern: &str,
        capability: Capability,
    ) -> Result<Self, String> {
        let rest = pattern
            .strip_prefix('/')
            .ok_or_else(|| format!("path pattern `{pattern}` must start with `/`"))?;
        let segments = rest
            .split('/')
            .map(|s| {
                if s.starts_with('{') && s.ends_with('}') && s.len() > 2 {
                    Ok(Segment::Any)
                } else if s.contains(['{', '}']) {
                    Err(format!(
                        "path pattern `{pattern}`: `{s}` is not a `{{name}}` segment"
                    ))
                } else {
                    Ok(Segment::Literal(s.into()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(CapabilityRoute {
            method,
            segments,
            capability,
        })
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match (segment, parts.next()) {
                (Segment::Literal(want), Some(got)) if **want == *got => {}
                (Segment::Any, Some(got)) if !got.is_empty() => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// Every route of the rules file, in order.
#[derive(Clone, Debug, Default)]
pub struct CapabilityRoutes(Vec<CapabilityRoute>);

impl CapabilityRoutes {
    /// The routes, first match wins.
    pub fn new(routes: Vec<CapabilityRoute>) -> Self {
        CapabilityRoutes(routes)
    }

    /// The capability of `method path` (the path without its query), if any route matches.
    pub fn capability(&self, method: &Method, path: &str) -> Option<Capability> {
        self.0
            .iter()
            .find(|r| r.matches(method, path))
            .map(|r| r.capability)
    }

    /// How many routes there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_paths_and_one_segment_wildcards() {
        let routes = CapabilityRoutes::new(vec![
            CapabilityRoute::new(Some(Method::POST), "/v1/chat/completions", Capability::Chat)
                .unwrap(),
            CapabilityRoute::new(None, "/v1/connectors/{name}/content", Capability::Connector)
                .unwrap(),
        ]);
        assert_eq!(
            routes.capability(&Method::POST, "/v1/chat/completions"),
            Some(Capability::Chat)
        );
        assert_eq!(
            routes.capability(&Method::GET, "/v1/chat/completions"),
            None
        );
        assert_eq!(
            routes.capability(&Method::POST, "/v1/chat/completions/x"),
            None
        );
        assert_eq!(
            routes.capability(&Method::POST, "/v1/connectors/drive/content"),
            Some(Capability::Connector)
        );
        assert_eq!(
            routes.capability(&Method::POST, "/v1/connectors//content"),
            None
        );
        assert!(CapabilityRoute::new(None, "v1/x", Capability::Chat).is_err());
        assert!(CapabilityRoute::new(None, "/v1/{x", Capability::Chat).is_err());
    }
}
