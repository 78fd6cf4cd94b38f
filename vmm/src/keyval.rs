//! QEMU's option syntax: `first,key=val,key=val`, where `,,` stands for a literal comma and
//! keys may repeat (`hostfwd=...,hostfwd=...`).

/// Why `key=val,...` text does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyValError {
    #[error("empty key in '{0}'")]
    EmptyKey(String),
    #[error("empty parameter")]
    EmptyParameter,
    #[error("'{0}' needs a value ({0}=...)")]
    NeedsValue(String),
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
                None => return Err(KeyValError::NeedsValue(part)),
            }
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

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.pairs.iter().rposition(|(k, _)| k == key)?;
        Some(self.pairs.remove(i).1)
    }
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
}
