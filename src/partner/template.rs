//! Templates of a declared REST integration: a request's path and the values of its body,
//! with `{placeholders}` filled from what the event and the mappings know. Pure, parsed once
//! at load (an unknown placeholder is an error then, never a surprise at the first event), and
//! unit-tested.
//!
//! Placeholders:
//! - `{tenant}`: the tenant id (the partner's account, usually);
//! - `{our_id}`: the object's id on our side, read from the payload where the event type says;
//! - `{id}`: the partner's id of the object (update and delete only);
//! - `{parent_id}`: the partner's id of the object's parent (create, for a type with a parent);
//! - `{payload.a.b}`: a field of the event's payload (its JSON form), `a.0.b` into an array.
//!
//! In a path every value is percent-encoded as one segment, so an id never adds a `/` or a
//! `?`. In a body a value that is a single placeholder keeps its JSON type (a number stays a
//! number); placeholders inside longer text are written as text.

use serde_json::Value;

/// A placeholder's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// `{tenant}`.
    Tenant,
    /// `{our_id}`.
    OurId,
    /// `{id}`.
    Id,
    /// `{parent_id}`.
    ParentId,
    /// `{payload.…}`: the path into the payload.
    Payload(Vec<String>),
}

impl Slot {
    fn parse(name: &str) -> Result<Slot, String> {
        match name.trim() {
            "tenant" => Ok(Slot::Tenant),
            "our_id" => Ok(Slot::OurId),
            "id" => Ok(Slot::Id),
            "parent_id" => Ok(Slot::ParentId),
            other => match other.strip_prefix("payload.") {
                Some(path) => field_path(path).map(Slot::Payload),
                None => Err(format!(
                    "unknown placeholder `{{{other}}}`: expected tenant, our_id, id, parent_id or payload.<field>"
                )),
            },
        }
    }
}

/// A dotted path into a JSON document (`product.name`), as its parts.
pub fn field_path(path: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(format!("`{path}` is not a field path like `product.name`"));
    }
    Ok(parts)
}

/// The value at `path` in `doc`, if there is one (a number indexes an array).
pub fn lookup<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |at, part| match at {
        Value::Object(map) => map.get(part),
        Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// A scalar as text (`None` for null, objects and arrays): how an id or a path segment reads.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Slot(Slot),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// What a template is filled from.
#[derive(Debug, Clone, Copy)]
pub struct Values<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// Our id of the object.
    pub our_id: &'a str,
    /// The partner's id of the object, when known.
    pub id: Option<&'a str>,
    /// The partner's id of its parent, when it has one.
    pub parent_id: Option<&'a str>,
    /// The payload, as JSON.
    pub payload: &'a Value,
}

impl Values<'_> {
    fn get(&self, slot: &Slot) -> Option<Value> {
        let text = |s: Option<&str>| s.map(|s| Value::String(s.to_owned()));
        match slot {
            Slot::Tenant => text(Some(self.tenant)),
            Slot::OurId => text(Some(self.our_id)),
            Slot::Id => text(self.id),
            Slot::ParentId => text(self.parent_id),
            Slot::Payload(path) => lookup(self.payload, path).cloned(),
        }
    }
}

impl Template {
    /// Parses `text`; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!("`{{{name}` is not closed with `}}`"));
                    }
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Slot(Slot::parse(&name)?));
                }
                '}' => return Err("a lone `}` (write `}}` for a brace)".to_owned()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Template { pieces })
    }

    /// The placeholders it uses.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Slot(s) => Some(s),
            Piece::Text(_) => None,
        })
    }

    /// The template as a URL path: each value percent-encoded as one segment. An error names
    /// a placeholder with no value (a path cannot leave one out).
    pub fn path(&self, values: &Values<'_>) -> Result<String, String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(slot) => {
                    let text = values
                        .get(slot)
                        .as_ref()
                        .and_then(scalar_text)
                        .filter(|t| !t.is_empty())
                        .ok_or_else(|| format!("the path's {} has no value", describe(slot)))?;
                    out.push_str(&encode_segment(&text));
                }
            }
        }
        Ok(out)
    }

    /// The template as a body value: a lone placeholder keeps its JSON type (null when the
    /// payload has no such field); otherwise text.
    pub fn value(&self, values: &Values<'_>) -> Value {
        if let [Piece::Slot(slot)] = self.pieces.as_slice() {
            return values.get(slot).unwrap_or(Value::Null);
        }
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Slot(slot) => {
                    if let Some(text) = values.get(slot).as_ref().and_then(scalar_text) {
                        out.push_str(&text);
                    }
                }
            }
        }
        Value::String(out)
    }
}

fn describe(slot: &Slot) -> String {
    match slot {
        Slot::Tenant => "{tenant}".to_owned(),
        Slot::OurId => "{our_id}".to_owned(),
        Slot::Id => "{id}".to_owned(),
        Slot::ParentId => "{parent_id}".to_owned(),
        Slot::Payload(p) => format!("{{payload.{}}}", p.join(".")),
    }
}

/// Percent-encodes one path segment or query value as the client does, a lone `.` or `..`
/// included (which a URL would otherwise resolve as a step).
pub fn encode_segment(s: &str) -> String {
    match s {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        other => super::client::encode(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(payload: &Value) -> Values<'_> {
        Values {
            tenant: "acme/eu",
            our_id: "p 1",
            id: Some("it_9"),
            parent_id: None,
            payload,
        }
    }

    #[test]
    fn a_path_encodes_each_value_as_one_segment() {
        let payload = json!({"product": {"id": "../x?y"}});
        let t = Template::parse("/v1/accounts/{tenant}/items/{id}?external_id={our_id}").unwrap();
        assert_eq!(
            t.path(&values(&payload)).unwrap(),
            "/v1/accounts/acme%2Feu/items/it_9?external_id=p%201"
        );
        let t = Template::parse("/x/{payload.product.id}").unwrap();
        assert_eq!(t.path(&values(&payload)).unwrap(), "/x/..%2Fx%3Fy");
        let dots = json!({"id": ".."});
        let t = Template::parse("/x/{payload.id}").unwrap();
        assert_eq!(t.path(&values(&dots)).unwrap(), "/x/%2E%2E");
    }

    #[test]
    fn a_path_without_a_value_is_an_error_naming_it() {
        let payload = json!({});
        let t = Template::parse("/x/{parent_id}/{payload.a}").unwrap();
        let err = t.path(&values(&payload)).unwrap_err();
        assert!(err.contains("{parent_id}"), "{err}");
    }

    #[test]
    fn a_lone_placeholder_keeps_its_json_type() {
        let payload = json!({"p": {"price": 1999, "tags": ["a"], "name": "Lamp"}});
        let v = values(&payload);
        assert_eq!(
            Template::parse("{payload.p.price}").unwrap().value(&v),
            json!(1999)
        );
        assert_eq!(
            Template::parse("{payload.p.tags.0}").unwrap().value(&v),
            json!("a")
        );
        assert_eq!(
            Template::parse("{payload.p.gone}").unwrap().value(&v),
            Value::Null
        );
        assert_eq!(
            Template::parse("{payload.p.name} ({payload.p.price}) {{x}}")
                .unwrap()
                .value(&v),
            json!("Lamp (1999) {x}")
        );
    }

    #[test]
    fn bad_templates_are_refused_with_why() {
        // (template tried, a word the error must contain)
        for (text, why) in [
            ("/x/{nope}", "unknown placeholder"),
            ("/x/{payload.}", "field path"),
            ("/x/{id", "not closed"),
            ("/x/}", "lone"),
        ] {
            let err = Template::parse(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
