//! QEMU's option syntax: `first,key=val,key=val`, where `,,` stands for a literal comma and
//! keys may repeat (`hostfwd=...,hostfwd=...`); and the JSON form QEMU takes for `-netdev`,
//! `-device` and `-object` when the value starts with `{` (libvirt's command lines).

use crate::json::{requote, Members, Node};

/// Why `key=val,...` text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyValError {
    #[error("empty key in '{0}'")]
    EmptyKey(String),
    #[error("empty parameter")]
    EmptyParameter,
    #[error("'{0}' needs a value ({0}=...)")]
    NeedsValue(String),
    #[error("JSON parse error, {0}")]
    Json(String),
    #[error("Invalid parameter type for '{0}', expected: {1}")]
    JsonType(String, &'static str),
    #[error("Parameter '{0}' is unexpected (in JSON, give an object: {{\"{1}\": {{...}}}})")]
    JsonDotted(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyVal {
    /// The leading bare word (`user` in `user,id=n0`), if any.
    pub first: Option<String>,
    pub pairs: Vec<(String, String)>,
}

fn split(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().unwrap().push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().unwrap().push(c);
        }
    }
    out
}

impl KeyVal {
    /// `implied` names the key a leading bare word stands for (`type`, `driver`).
    pub fn parse(s: &str, implied: Option<&str>) -> Result<KeyVal, KeyValError> {
        Ok(KeyVal::parse_flags(s, implied, &|_| false)?.0)
    }

    /// As [`KeyVal::parse`], with QEMU's short-form booleans (deprecated, but still taken by
    /// its `-netdev`, `-device`, `-nic`, `-net`): a bare `KEY` is `KEY=on` and `noKEY` is
    /// `KEY=off`, for the keys `is_flag` names. Also returns each short form written, with the
    /// long form it stands for (for QEMU's warning).
    pub fn parse_flags(
        s: &str,
        implied: Option<&str>,
        is_flag: &dyn Fn(&str) -> bool,
    ) -> Result<(KeyVal, Vec<(String, String)>), KeyValError> {
        let mut short_forms = vec![];
        let mut kv = KeyVal::default();
        let mut parts = split(s);
        // A comma at the end ends the list (as QEMU reads it), unless it is all there is.
        if parts.len() > 1 && parts.last().is_some_and(String::is_empty) {
            parts.pop();
        }
        for (i, part) in parts.into_iter().enumerate() {
            match part.split_once('=') {
                Some((k, v)) => {
                    if k.is_empty() {
                        return Err(KeyValError::EmptyKey(part));
                    }
                    if Some(k) == implied && i == 0 {
                        kv.first = Some(v.to_string());
                    } else {
                        kv.pairs.push((k.to_string(), v.to_string()));
                    }
                }
                None if i == 0 && implied.is_some() && !part.is_empty() => kv.first = Some(part),
                None if part.is_empty() => return Err(KeyValError::EmptyParameter),
                None => {
                    let (key, value) = match part.strip_prefix("no") {
                        Some(k) if is_flag(k) => (k.to_string(), "off"),
                        _ if is_flag(&part) => (part.clone(), "on"),
                        _ => return Err(KeyValError::NeedsValue(part)),
                    };
                    short_forms.push((part, format!("{key}={value}")));
                    kv.pairs.push((key, value.into()));
                }
            }
        }
        Ok((kv, short_forms))
    }

    /// The option's value in either of QEMU's forms: JSON when it starts with `{`, else
    /// `key=val,...`.
    pub fn parse_option(s: &str, implied: &str) -> Result<KeyVal, KeyValError> {
        if is_json(s) {
            KeyVal::from_json(s, implied)
        } else {
            KeyVal::parse(s, Some(implied))
        }
    }

    /// A JSON object as `key=val` pairs, in its order: `implied` (`driver`, `type`) becomes
    /// `first`, strings stay as they are, booleans become `on`/`off` and numbers their decimal
    /// text. A list (the keys in LIST_KEYS: QAPI's `['String']`, whose items are
    /// `{"str": "..."}`; plain strings are taken too) repeats its key, as `key=a,key=b` does.
    pub fn from_json(s: &str, implied: &str) -> Result<KeyVal, KeyValError> {
        // 'Single-quoted' strings as QEMU's parser takes them: given to serde_json
        // double-quoted. The requoting stops where the object closes; anything after it is
        // refused here, as serde_json refuses it after a double-quoted object.
        let requoted = s.contains('\'').then(|| requote(s.as_bytes()));
        let json = match &requoted {
            Some((json, map)) => {
                let end = map.last().copied().unwrap_or(s.len());
                if !s.as_bytes()[end.min(s.len())..]
                    .iter()
                    .all(u8::is_ascii_whitespace)
                {
                    return Err(KeyValError::Json(format!(
                        "trailing characters at column {}",
                        end + 1
                    )));
                }
                json.as_slice()
            }
            None => s.as_bytes(),
        };
        let Members(members) =
            serde_json::from_slice(json).map_err(|e| KeyValError::Json(e.to_string()))?;
        let mut kv = KeyVal::default();
        for (key, value) in members {
            if key == implied {
                match value {
                    Node::Scalar(serde_json::Value::String(v)) => kv.first = Some(v),
                    _ => return Err(KeyValError::JsonType(key, "string")),
                }
                continue;
            }
            // The dotted form is the text form's; JSON nests (QEMU refuses it too).
            if let Some((outer, _)) = key.split_once('.') {
                return Err(KeyValError::JsonDotted(key.clone(), outer.into()));
            }
            json_member(&key, value, &mut kv.pairs)?;
        }
        Ok(kv)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// First key not in `allowed`, for "unknown parameter" errors.
    pub fn unknown_key(&self, allowed: &[&str]) -> Option<&str> {
        self.pairs
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !allowed.contains(k))
    }

    /// Each key once, with the last value it was given (as QEMU sets a device's properties:
    /// in order, the last one standing).
    pub fn keep_last(&mut self) {
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<(String, String)> = std::mem::take(&mut self.pairs)
            .into_iter()
            .rev()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        kept.reverse();
        self.pairs = kept;
    }

    /// As QEMU's QemuOpts sets a device's properties: each one's last value, but the first
    /// `id=` (read before them).
    pub fn keep_last_but_first_id(&mut self) {
        let id = self.take_first("id");
        self.keep_last();
        if let Some(id) = id {
            self.pairs.push(("id".into(), id));
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.pairs.iter().rposition(|(k, _)| k == key)?;
        Some(self.pairs.remove(i).1)
    }

    /// Takes every `key` out; the first value it was given.
    pub fn take_first(&mut self, key: &str) -> Option<String> {
        let first = self
            .pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone());
        self.pairs.retain(|(k, _)| k != key);
        first
    }

    /// Takes every `key` out; the last value it was given.
    pub fn take_last(&mut self, key: &str) -> Option<String> {
        let last = self.remove(key);
        self.pairs.retain(|(k, _)| k != key);
        last
    }
}

/// The members of the options nicvm reads that QEMU's schema makes lists (of `-netdev user`).
const LIST_KEYS: [&str; 3] = ["hostfwd", "guestfwd", "dnssearch"];

/// The members QEMU's schema makes objects: the socket addresses of `-netdev stream`
/// (`addr`) and `dgram` (`local`, `remote`).
const OBJECT_KEYS: [&str; 3] = ["addr", "local", "remote"];

/// QEMU reads `-netdev`, `-device` and `-object` as JSON when they start with `{`.
pub fn is_json(val: &str) -> bool {
    val.trim_start().starts_with('{')
}

/// Adds to `out` the `key=val` pairs one JSON member stands for. The types QEMU's schema gives
/// are kept where nicvm's reading of the text would differ: a boolean property takes
/// `true`/`false` only, a list member a list; an integer `addr` is QEMU's devfn (slot * 8 +
/// function), where the text form is `SLOT[.FUNCTION]` in hex. An object member (OBJECT_KEYS)
/// is its members under dotted keys, as the text form writes them (`-netdev stream`'s
/// `"addr": {"type": "unix", ...}` is `addr.type=unix,...`). Other members take a string, a
/// number or a boolean (laxer than QEMU).
fn json_member(key: &str, value: Node, out: &mut Vec<(String, String)>) -> Result<(), KeyValError> {
    let wrong = |expected| KeyValError::JsonType(key.into(), expected);
    const DEVFN: &str = "a device and function number (slot * 8 + function)";
    let list = LIST_KEYS.contains(&key);
    let mut push = |text: String| out.push((key.to_string(), text));
    match value {
        Node::List(items) if list => {
            for item in items {
                let text = match item {
                    Node::Scalar(serde_json::Value::String(v)) => v,
                    Node::Object(Members(mut m)) if m.len() == 1 && m[0].0 == "str" => {
                        match m.pop() {
                            Some((_, Node::Scalar(serde_json::Value::String(v)))) => v,
                            _ => return Err(wrong("a list of strings")),
                        }
                    }
                    _ => return Err(wrong("a list of strings")),
                };
                push(text);
            }
        }
        _ if list => return Err(wrong("array")),
        Node::Object(Members(members)) if OBJECT_KEYS.contains(&key) && !members.is_empty() => {
            for (k, v) in members {
                json_member(&format!("{key}.{k}"), v, out)?;
            }
        }
        Node::Scalar(serde_json::Value::Bool(b)) if key != "addr" => {
            push(if b { "on" } else { "off" }.into())
        }
        _ if crate::qemu_compat::is_boolean_property(key) => return Err(wrong("boolean")),
        Node::Scalar(serde_json::Value::Number(n)) if key == "addr" => match n.as_u64() {
            Some(devfn) if devfn < 256 => push(format!("{:x}.{:x}", devfn >> 3, devfn & 7)),
            _ => return Err(wrong(DEVFN)),
        },
        Node::Scalar(serde_json::Value::Bool(_)) => return Err(wrong(DEVFN)),
        Node::Scalar(serde_json::Value::String(v)) => push(v),
        Node::Scalar(serde_json::Value::Number(n)) => {
            push(json_integer(&n).ok_or(wrong("an integer"))?)
        }
        Node::Object(_) if OBJECT_KEYS.contains(&key) => {
            return Err(wrong("an object with members, or a string or number"))
        }
        _ => return Err(wrong("a string, number or boolean")),
    }
    Ok(())
}

/// A JSON number as the integer text the option takes: every property nicvm reads is an
/// integer, a string or a boolean. A float with no fraction that an f64 holds exactly (`1e1`,
/// `-0`) is taken as that integer (QEMU would want it written as one); others are not.
fn json_integer(n: &serde_json::Number) -> Option<String> {
    if n.is_u64() || n.is_i64() {
        return Some(n.to_string());
    }
    let f = n.as_f64()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0)
        .then(|| format!("{}", f as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trailing_comma_ends_the_list() {
        let kv = KeyVal::parse("e1000,netdev=n0,", Some("driver")).unwrap();
        assert_eq!(kv.first.as_deref(), Some("e1000"));
        assert_eq!(kv.pairs, [("netdev".to_string(), "n0".to_string())]);
        assert_eq!(
            KeyVal::parse("a,,", None).unwrap_err(),
            KeyValError::NeedsValue("a,".into()),
            "an escaped comma stays one"
        );
        assert_eq!(KeyVal::parse(",", None), Err(KeyValError::EmptyParameter));
        assert_eq!(
            KeyVal::parse("e1000,,,netdev=n0", Some("driver"))
                .unwrap()
                .first
                .as_deref(),
            Some("e1000,"),
            "not a trailing comma: an escaped one, then a separator"
        );
    }

    #[test]
    fn keep_last_keeps_each_key_once_with_its_last_value() {
        let mut kv = KeyVal::parse("mac=1,netdev=a,mac=2,id=x", None).unwrap();
        kv.keep_last();
        let pairs: Vec<(&str, &str)> = kv
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(pairs, [("netdev", "a"), ("mac", "2"), ("id", "x")]);
    }

    #[test]
    fn implied_key_escapes_and_repeats() {
        let kv = KeyVal::parse(
            "user,id=n0,hostfwd=tcp::1-:2,hostfwd=udp::3-:4",
            Some("type"),
        )
        .unwrap();
        assert_eq!(kv.first.as_deref(), Some("user"));
        assert_eq!(kv.get("id"), Some("n0"));
        let fwds: Vec<&str> = kv
            .pairs
            .iter()
            .filter(|(k, _)| k == "hostfwd")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(fwds, ["tcp::1-:2", "udp::3-:4"]);
        assert_eq!(
            kv.get("hostfwd"),
            Some("udp::3-:4"),
            "the last one wins for get()"
        );
        let kv = KeyVal::parse("type=tap,script=/a,,b", Some("type")).unwrap();
        assert_eq!(kv.first.as_deref(), Some("tap"));
        assert_eq!(kv.get("script"), Some("/a,b"));
        assert!(KeyVal::parse("user,,", Some("type")).is_ok());
        assert_eq!(
            KeyVal::parse("user,id", Some("type"))
                .unwrap_err()
                .to_string(),
            "'id' needs a value (id=...)"
        );
        // An escaped comma makes "user,id" a key, which no option knows.
        let odd = KeyVal::parse("user,,id=1,", Some("type")).unwrap();
        assert_eq!(odd.unknown_key(&["id"]), Some("user,id"));
        assert!(KeyVal::parse("=x", Some("type")).is_err());
        assert_eq!(kv.unknown_key(&["script"]), None);
        assert_eq!(kv.unknown_key(&[]), Some("script"));
    }

    #[test]
    fn short_form_booleans_for_the_keys_that_take_them() {
        let flag = |k: &str| k == "csum" || k == "ipv6";
        let (kv, short) =
            KeyVal::parse_flags("user,ipv6,nocsum,id=n0", Some("type"), &flag).unwrap();
        assert_eq!(
            kv,
            KeyVal::parse("user,ipv6=on,csum=off,id=n0", Some("type")).unwrap()
        );
        assert_eq!(
            short,
            [
                ("ipv6".to_string(), "ipv6=on".to_string()),
                ("nocsum".into(), "csum=off".into())
            ]
        );
        for not_flags in ["user,id", "user,noid", "user,no"] {
            assert!(
                matches!(
                    KeyVal::parse_flags(not_flags, Some("type"), &flag),
                    Err(KeyValError::NeedsValue(_))
                ),
                "{not_flags}"
            );
        }
        assert_eq!(
            KeyVal::parse("user,ipv6", Some("type")).unwrap_err(),
            KeyValError::NeedsValue("ipv6".into()),
            "parse() takes no short forms"
        );
    }

    #[test]
    fn json_objects_read_as_their_key_value_form() {
        let json = KeyVal::parse_option(
            r#"{"type":"user","id":"n0","ipv6":false,"hostfwd":[{"str":"tcp::1-:2"},"udp::3-:4"],"mtu":1400}"#,
            "type",
        )
        .unwrap();
        let text = KeyVal::parse(
            "user,id=n0,ipv6=off,hostfwd=tcp::1-:2,hostfwd=udp::3-:4,mtu=1400",
            Some("type"),
        )
        .unwrap();
        assert_eq!(json, text, "same pairs in the same order");
        // libvirt's passt line: objects are dotted keys.
        let json = KeyVal::parse_option(
            r#"{"type":"stream","addr":{"type":"unix","path":"/run/p.sock"},"server":false,"reconnect":5,"id":"h"}"#,
            "type",
        )
        .unwrap();
        let text = KeyVal::parse(
            "stream,addr.type=unix,addr.path=/run/p.sock,server=off,reconnect=5,id=h",
            Some("type"),
        )
        .unwrap();
        assert_eq!(json, text);
        let dev = KeyVal::parse_option(
            r#" {"driver":"e1000","netdev":"n0","addr":"0x5"}"#,
            "driver",
        )
        .unwrap();
        assert_eq!(dev.first.as_deref(), Some("e1000"));
        assert_eq!(dev.get("addr"), Some("0x5"));
        assert_eq!(
            KeyVal::parse_option("e1000,netdev=n0", "driver")
                .unwrap()
                .get("netdev"),
            Some("n0"),
            "text that is not JSON is read as before"
        );
        // QEMU's parser takes 'single-quoted' strings too, a " in them and \' in either kind.
        let single = KeyVal::parse_option(
            r#"{'type':'user','id':'n0','ipv6':false,'hostfwd':['tcp::1-:2',"udp::3-:4"],'mtu':1400} "#,
            "type",
        )
        .unwrap();
        let text = KeyVal::parse(
            "user,id=n0,ipv6=off,hostfwd=tcp::1-:2,hostfwd=udp::3-:4,mtu=1400",
            Some("type"),
        );
        assert_eq!(Ok(single), text);
        let quotes = KeyVal::parse_option(r#"{'type':'user','domain':'a"b\'c'}"#, "type").unwrap();
        assert_eq!(quotes.get("domain"), Some(r#"a"b'c"#));
    }

    #[test]
    fn json_that_is_no_option_says_why() {
        let why = |s: &str| KeyVal::from_json(s, "type").unwrap_err().to_string();
        assert!(why(r#"{"type":"user""#).starts_with("JSON parse error, "));
        assert!(why(r#"["user"]"#).contains("a JSON object"));
        assert!(why(r#"{"id":"a","id":"b"}"#).contains("duplicate key 'id'"));
        // No NUL, in a value or a key, double- or single-quoted (QEMU makes it C0 80, which no
        // path, id or host name can use).
        for nul in [
            r#"{"type":"user","domain":"a\u0000b"}"#,
            r#"{"type":"user","a\u0000":"b"}"#,
            r#"{'type':'user','hostfwd':['\u0000']}"#,
        ] {
            assert!(
                why(nul).contains("\\u0000 is not supported"),
                "{nul}: {}",
                why(nul)
            );
        }
        // Nothing after the object, whichever quotes it has.
        assert!(why(r#"{"type":"user"} x"#).contains("trailing characters"));
        assert!(why(r#"{'type':'user'} x"#).contains("trailing characters"));
        assert!(why("{'type':'user'}\n{}").contains("trailing characters"));
        assert_eq!(
            why(r#"{"type":7}"#),
            "Invalid parameter type for 'type', expected: string"
        );
        assert_eq!(
            why(r#"{"type":"user","net":[{"a":1}]}"#),
            "Invalid parameter type for 'net', expected: a string, number or boolean"
        );
        assert_eq!(
            why(r#"{"type":"user","hostfwd":[{"str":1}]}"#),
            "Invalid parameter type for 'hostfwd', expected: a list of strings"
        );
        assert!(why(r#"{"type":"user","id":null}"#).contains("'id'"));
        // Objects only where QEMU's schema has them, not empty, each key once; no dotted keys.
        for (bad, said) in [
            (
                r#"{"type":"user","restrict":{}}"#,
                "'restrict', expected: boolean",
            ),
            (
                r#"{"type":"user","mac":{"a":"b"}}"#,
                "'mac', expected: a string",
            ),
            (r#"{"type":"stream","addr":{}}"#, "'addr', expected"),
            (
                r#"{"type":"stream","addr":{"type":"unix","type":"inet"}}"#,
                "duplicate key 'type'",
            ),
            (
                r#"{"type":"stream","addr":{"x":{"y":1}}}"#,
                "'addr.x', expected",
            ),
            (
                r#"{"type":"stream","addr.type":"unix"}"#,
                "Parameter 'addr.type' is unexpected",
            ),
        ] {
            assert!(why(bad).contains(said), "{bad}: {}", why(bad));
        }
        for (v, text) in [("1e1", Some("10")), ("-0", Some("0")), ("7", Some("7"))] {
            let kv = KeyVal::from_json(&format!(r#"{{"type":"user","mtu":{v}}}"#), "type");
            assert_eq!(
                kv.ok()
                    .and_then(|k| k.get("mtu").map(String::from))
                    .as_deref(),
                text,
                "{v}"
            );
        }
        for v in ["1.5", "18446744073709551616", "1e999"] {
            let e = why(&format!(r#"{{"type":"user","mtu":{v}}}"#));
            assert!(
                e.contains("'mtu', expected: an integer") || e.starts_with("JSON parse error"),
                "{v}: {e}"
            );
        }
        // Deeper than serde_json's recursion limit: an error, not a stack overflow.
        let deep = format!(
            r#"{{"type":"stream","addr":{}1{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert!(why(&deep).starts_with("JSON parse error, "));
        assert!(
            why(r#"{"type":"user","net":["10.0.0.0/8"]}"#).contains("'net'"),
            "only the list members take lists"
        );
        assert_eq!(
            why(r#"{"type":"user","hostfwd":"tcp::1-:2"}"#),
            "Invalid parameter type for 'hostfwd', expected: array"
        );
        for v in [r#""yes""#, "1"] {
            assert_eq!(
                why(&format!(r#"{{"type":"user","restrict":{v}}}"#)),
                "Invalid parameter type for 'restrict', expected: boolean"
            );
        }
        // QEMU's devfn: slot 5 is 40; function 1 of slot 5 is 41 (refused later: nicvm's
        // NICs have one function).
        let addr = |v: &str| {
            KeyVal::from_json(&format!(r#"{{"driver":"e1000","addr":{v}}}"#), "driver")
                .map(|kv| kv.get("addr").unwrap().to_string())
        };
        assert_eq!(addr("40").unwrap(), "5.0");
        assert_eq!(addr("41").unwrap(), "5.1");
        assert_eq!(addr(r#""0x5""#).unwrap(), "0x5", "the text form as it is");
        for bad in ["256", "-8", "5.0", "true"] {
            assert!(addr(bad).is_err(), "{bad}");
        }
        assert!(why(r#"{"type":"user"} x"#).starts_with("JSON parse error, "));
    }
}
