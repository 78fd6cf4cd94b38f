//! JSON as QEMU's parser reads it, for QMP and for the JSON form of `-netdev`, `-device` and
//! `-object`: objects keep their members in the order written and repeat no key, and strings
//! may be 'single-quoted'. Unlike QEMU's, strings (keys too) hold no NUL: QEMU turns `\u0000`
//! into the bytes C0 80, which no path, id or host name can use.

use serde::de::{Error, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON value read strictly. serde_json's own `Value` sorts an object's members and keeps
/// the last of a repeated key, so `{"execute":"query-status","execute":"quit"}` would quit.
#[derive(Debug)]
pub enum Node {
    /// A string, number, boolean or null.
    Scalar(Value),
    List(Vec<Node>),
    Object(Members),
}

/// A JSON object's members in the order written, each key once.
#[derive(Debug)]
pub struct Members(pub Vec<(String, Node)>);

impl Node {
    /// As serde_json's `Value` (an object's members sorted).
    pub fn into_value(self) -> Value {
        match self {
            Node::Scalar(v) => v,
            Node::List(items) => Value::Array(items.into_iter().map(Node::into_value).collect()),
            Node::Object(Members(m)) => Value::Object(
                m.into_iter()
                    .map(|(k, v)| (k, v.into_value()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }
}

/// `s`, unless it holds a NUL. One can only come as `\u0000` (a raw one is a control
/// character, refused in a string by serde_json as by QEMU).
fn no_nul<E: Error>(s: &str) -> Result<&str, E> {
    if s.contains('\0') {
        Err(E::custom("\\u0000 is not supported"))
    } else {
        Ok(s)
    }
}

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Members, A::Error> {
                members(map)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The members `map` holds, refusing a key given twice.
fn members<'de, A: MapAccess<'de>>(mut map: A) -> Result<Members, A::Error> {
    let mut members: Vec<(String, Node)> = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        no_nul::<A::Error>(&key)?;
        let value = map.next_value::<Node>()?;
        if members.iter().any(|(k, _)| *k == key) {
            return Err(A::Error::custom(format_args!("duplicate key '{key}'")));
        }
        members.push((key, value));
    }
    Ok(Members(members))
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Scalar(no_nul(v)?.into()))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Node, E> {
                no_nul::<E>(&v)?;
                Ok(Node::Scalar(v.into()))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = vec![];
                while let Some(item) = seq.next_element::<Node>()? {
                    items.push(item);
                }
                Ok(Node::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Node, A::Error> {
                members(map).map(Node::Object)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The first message of `input` (up to where its outermost object or array closes, or the
/// first line end outside one) with its single-quoted strings double-quoted (a `"` in them
/// escaped, a `\'` unescaped), as QEMU's JSON parser reads them; and for each byte of the
/// result (and its end) the offset in `input` it came from. One message at a time: a client
/// that pipelines many does not make each one cost the whole buffer.
pub fn requote(input: &[u8]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::with_capacity(input.len().min(4096) + 2);
    let mut map = Vec::with_capacity(input.len().min(4096) + 3);
    // The quote of the string we are in, if any, and how deep in objects and arrays.
    let mut quote = None;
    let mut depth = 0usize;
    // Something other than white space went out: a line end at depth 0 then ends the message.
    let mut begun = false;
    let mut i = 0;
    while i < input.len() {
        if quote.is_none() && depth == 0 && begun {
            if let Some(b'}' | b']' | b'\n') = out.last() {
                break;
            }
        }
        begun |= !input[i].is_ascii_whitespace();
        let b = input[i];
        let mut put = |bytes: &[u8]| {
            for &x in bytes {
                out.push(x);
                map.push(i);
            }
        };
        match (quote, b) {
            (None, b'\'') => {
                quote = Some(b'\'');
                put(b"\"");
            }
            (None, b'"') => {
                quote = Some(b'"');
                put(b"\"");
            }
            (Some(_), b'\\') if i + 1 < input.len() => {
                let next = input[i + 1];
                if next == b'\'' {
                    put(b"'"); // QEMU takes \' in either kind of string
                } else {
                    put(&[b, next]);
                }
                i += 1;
            }
            (Some(b'\''), b'"') => put(b"\\\""),
            (Some(q), _) if b == q => {
                quote = None;
                put(b"\"");
            }
            (None, b'{' | b'[') => {
                depth += 1;
                put(&[b]);
            }
            (None, b'}' | b']') => {
                depth = depth.saturating_sub(1);
                put(&[b]);
            }
            _ => put(&[b]),
        }
        i += 1;
    }
    map.push(i);
    (out, map)
}
