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
        for (i, part) in split(s).into_iter().enumerate() {
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

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.pairs.iter().rposition(|(k, _)| k == key)?;
        Some(self.pairs.remove(i).1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(KeyVal::parse("user,,id=1,", Some("type")).is_err());
        assert!(KeyVal::parse("=x", Some("type")).is_err());
        assert_eq!(kv.unknown_key(&["script"]), None);
        assert_eq!(kv.unknown_key(&[]), Some("script"));
    }
}
