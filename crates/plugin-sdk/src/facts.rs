//! Declaring the facts a plugin needs, as `const` values, and rendering them at compile time to
//! the `membrane.facts` manifest JSON (the same document `membrane_abi::FactManifest`
//! deserializes; a test checks the two agree).

use membrane_abi::ABI_VERSION;

/// Seconds in a duration written with [`seconds`], [`minutes`], [`hours`], [`days`] or [`weeks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(u64);

pub const fn seconds(n: u64) -> Window {
    Window(n)
}
pub const fn minutes(n: u64) -> Window {
    Window(n * 60)
}
pub const fn hours(n: u64) -> Window {
    Window(n * 3_600)
}
pub const fn days(n: u64) -> Window {
    Window(n * 86_400)
}
pub const fn weeks(n: u64) -> Window {
    Window(n * 7 * 86_400)
}

impl Window {
    pub const fn secs(self) -> u64 {
        self.0
    }
    pub const fn millis(self) -> i64 {
        self.0 as i64 * 1_000
    }
}

/// One declared fact (see `membrane_abi::Fact` for the meaning of each kind).
#[derive(Debug, Clone, Copy)]
pub enum FactSpec {
    EventCount {
        event: &'static str,
        within: Option<Window>,
        filter: Option<&'static Filter>,
    },
    Property {
        key: &'static str,
    },
    PropertyTime {
        key: &'static str,
    },
}

/// The number of the user's events named `event` (all of history; narrow it with
/// [`FactSpec::within`] and [`FactSpec::filter`]).
pub const fn event_count(event: &'static str) -> FactSpec {
    FactSpec::EventCount {
        event,
        within: None,
        filter: None,
    }
}

/// The contact property `key`, whatever its type.
pub const fn property(key: &'static str) -> FactSpec {
    FactSpec::Property { key }
}

/// The contact property `key` read as an RFC 3339 timestamp (missing unless it parses).
pub const fn property_time(key: &'static str) -> FactSpec {
    FactSpec::PropertyTime { key }
}

impl FactSpec {
    /// Counts only events with `occurred_at >= now - window`. Only for event counts.
    pub const fn within(self, window: Window) -> FactSpec {
        match self {
            FactSpec::EventCount { event, filter, .. } => FactSpec::EventCount {
                event,
                within: Some(window),
                filter,
            },
            _ => panic!("`within` applies to event counts only"),
        }
    }

    /// Counts only events whose own properties pass `filter`. Only for event counts.
    pub const fn filter(self, filter: &'static Filter) -> FactSpec {
        match self {
            FactSpec::EventCount { event, within, .. } => FactSpec::EventCount {
                event,
                within,
                filter: Some(filter),
            },
            _ => panic!("`filter` applies to event counts only"),
        }
    }
}

/// A condition on an event's own properties (`membrane_abi::EventFilter`).
#[derive(Debug, Clone, Copy)]
pub enum Filter {
    All(&'static [Filter]),
    Any(&'static [Filter]),
    Not(&'static Filter),
    Test(&'static str, Test),
}

/// A test of one property value (`membrane_abi::PropertyTest`).
#[derive(Debug, Clone, Copy)]
pub enum Test {
    Compare(Cmp, Literal),
    Exists,
    NotExists,
    Contains(&'static str),
    StartsWith(&'static str),
    In(&'static [Literal]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A literal in a filter. Numbers are integers: a manifest is rendered in `const` context,
/// where floats cannot be formatted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Literal {
    Str(&'static str),
    Int(i64),
    Bool(bool),
    Null,
}

/// The manifest JSON, rendered by a `const fn` into a fixed array. Writes past `N` are only
/// counted, so rendering with `N = 0` measures the length and a second pass fills the array.
pub struct ManifestJson<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> ManifestJson<N> {
    pub const fn render(facts: &[FactSpec]) -> Self {
        let mut out = ManifestJson {
            bytes: [0; N],
            len: 0,
        };
        out.raw("{\"abi\":");
        out.unsigned(ABI_VERSION as u64);
        out.raw(",\"facts\":[");
        let mut i = 0;
        while i < facts.len() {
            if i > 0 {
                out.raw(",");
            }
            out.fact(&facts[i]);
            i += 1;
        }
        out.raw("]}");
        out
    }

    pub const fn len(&self) -> usize {
        self.len
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub const fn into_bytes(self) -> [u8; N] {
        assert!(
            self.len == N,
            "the manifest was measured with another fact list"
        );
        self.bytes
    }

    /// What was rendered, when it fit.
    #[cfg(test)]
    pub(crate) fn written(&self) -> &[u8] {
        &self.bytes[..if self.len <= N { self.len } else { N }]
    }

    const fn byte(&mut self, b: u8) {
        if self.len < N {
            self.bytes[self.len] = b;
        }
        self.len += 1;
    }

    const fn raw(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            self.byte(bytes[i]);
            i += 1;
        }
    }

    /// A JSON string: quotes, backslashes and control characters escaped.
    const fn string(&mut self, text: &str) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.byte(b'"');
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'"' || b == b'\\' {
                self.byte(b'\\');
                self.byte(b);
            } else if b < 0x20 {
                self.raw("\\u00");
                self.byte(HEX[(b >> 4) as usize]);
                self.byte(HEX[(b & 0xf) as usize]);
            } else {
                self.byte(b);
            }
            i += 1;
        }
        self.byte(b'"');
    }

    const fn unsigned(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        while count > 0 {
            count -= 1;
            self.byte(digits[count]);
        }
    }

    const fn signed(&mut self, n: i64) {
        if n < 0 {
            self.byte(b'-');
        }
        self.unsigned(n.unsigned_abs());
    }

    const fn key(&mut self, key: &str) {
        self.byte(b',');
        self.string(key);
        self.byte(b':');
    }

    const fn fact(&mut self, fact: &FactSpec) {
        match fact {
            FactSpec::EventCount {
                event,
                within,
                filter,
            } => {
                self.raw("{\"kind\":\"event_count\"");
                self.key("event");
                self.string(event);
                if let Some(window) = within {
                    self.key("within_secs");
                    self.unsigned(window.secs());
                }
                if let Some(filter) = filter {
                    self.key("filter");
                    self.filter(filter);
                }
            }
            FactSpec::Property { key } => {
                self.raw("{\"kind\":\"property\"");
                self.key("key");
                self.string(key);
            }
            FactSpec::PropertyTime { key } => {
                self.raw("{\"kind\":\"property_time\"");
                self.key("key");
                self.string(key);
            }
        }
        self.byte(b'}');
    }

    const fn filter(&mut self, filter: &Filter) {
        match filter {
            Filter::All(of) | Filter::Any(of) => {
                self.raw(if matches!(filter, Filter::All(_)) {
                    "{\"op\":\"all\""
                } else {
                    "{\"op\":\"any\""
                });
                self.key("of");
                self.byte(b'[');
                let mut i = 0;
                while i < of.len() {
                    if i > 0 {
                        self.byte(b',');
                    }
                    self.filter(&of[i]);
                    i += 1;
                }
                self.byte(b']');
            }
            Filter::Not(inner) => {
                self.raw("{\"op\":\"not\"");
                self.key("filter");
                self.filter(inner);
            }
            Filter::Test(key, test) => {
                self.raw("{\"op\":\"test\"");
                self.key("key");
                self.string(key);
                self.key("test");
                self.test(test);
            }
        }
        self.byte(b'}');
    }

    const fn test(&mut self, test: &Test) {
        match test {
            Test::Compare(cmp, value) => {
                self.raw("{\"test\":\"compare\"");
                self.key("cmp");
                self.string(match cmp {
                    Cmp::Eq => "eq",
                    Cmp::Ne => "ne",
                    Cmp::Lt => "lt",
                    Cmp::Le => "le",
                    Cmp::Gt => "gt",
                    Cmp::Ge => "ge",
                });
                self.key("value");
                self.literal(value);
            }
            Test::Exists => self.raw("{\"test\":\"exists\""),
            Test::NotExists => self.raw("{\"test\":\"not_exists\""),
            Test::Contains(text) | Test::StartsWith(text) => {
                self.raw(if matches!(test, Test::Contains(_)) {
                    "{\"test\":\"contains\""
                } else {
                    "{\"test\":\"starts_with\""
                });
                self.key("value");
                self.string(text);
            }
            Test::In(values) => {
                self.raw("{\"test\":\"in\"");
                self.key("values");
                self.byte(b'[');
                let mut i = 0;
                while i < values.len() {
                    if i > 0 {
                        self.byte(b',');
                    }
                    self.literal(&values[i]);
                    i += 1;
                }
                self.byte(b']');
            }
        }
        self.byte(b'}');
    }

    const fn literal(&mut self, literal: &Literal) {
        match literal {
            Literal::Str(text) => {
                self.raw("{\"type\":\"str\",\"value\":");
                self.string(text);
            }
            Literal::Int(n) => {
                self.raw("{\"type\":\"num\",\"value\":");
                self.signed(*n);
            }
            Literal::Bool(flag) => {
                self.raw("{\"type\":\"bool\",\"value\":");
                self.raw(if *flag { "true" } else { "false" });
            }
            Literal::Null => self.raw("{\"type\":\"null\""),
        }
        self.byte(b'}');
    }
}
