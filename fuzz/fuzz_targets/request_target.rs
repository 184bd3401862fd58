//! The path normaliser: any raw request target. A normalised target
//! normalises to itself and holds no encoded slash, backslash, encoded
//! percent, NUL or dot segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use privacy_gateway::request_target::RequestTarget;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = RequestTarget::parse(data) else {
        return;
    };
    let text = target.to_string();
    assert_eq!(RequestTarget::parse(text.as_bytes()).as_ref(), Ok(&target));
    assert!(text.starts_with('/') && text.is_ascii());
    let path = target.path();
    let upper = path.to_ascii_uppercase();
    for trick in ["%2F", "%5C", "%25", "%00", "\\", "#", "?"] {
        assert!(!upper.contains(trick), "{text}");
    }
    for segment in path.split('/') {
        let name = segment.split(';').next().unwrap_or_default();
        assert!(name != "." && name != "..", "{text}");
    }
});
