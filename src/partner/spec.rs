//! A REST integration declared in a file (TOML): which event types make which of the partner's
//! objects, the request for each action, and where the ids are. Read and validated once at
//! start ([`Spec::load`]); every error names the file, the key and why. What the file declares
//! is run by [`super::rest`], through the generic driver.
//!
//! `integrations/shop.toml` declares the reference shop's integration; `docs/integrations.md`
//! documents every key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::template::{Slot, Template, field_path};
use crate::outbox::control;

/// Why an integration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file cannot be read.
    #[error("{file}: cannot read the integration file: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape (an unknown key, a wrong type).
    #[error("{file}: {detail}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message: the line, the key and what it expected.
        detail: String,
    },
    /// A key's value cannot be used.
    #[error("{file}: `{key}`: {why}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, dotted from the top (`objects.shop_price.parent`).
        key: String,
        /// Why.
        why: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    #[serde(default)]
    partner: FilePartner,
    #[serde(default)]
    payload: FilePayload,
    #[serde(default)]
    events: BTreeMap<String, FileEvent>,
    #[serde(default)]
    objects: BTreeMap<String, FileObject>,
    backfill: Option<FileBackfill>,
    webhooks: Option<FileWebhooks>,
}

/// `[webhooks]`: the file declares a webhooks integration (each tenant's events to that
/// tenant's own endpoint) rather than a partner's objects.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebhooks {
    source: Option<String>,
    type_prefix: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackfill {
    event_type: String,
    aggregate_type: Option<String>,
    query: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartner {
    url: Option<String>,
    url_env: Option<String>,
    token_env: Option<String>,
    auth_header: Option<String>,
    auth_scheme: Option<String>,
    idempotency_header: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePayload {
    #[serde(default)]
    proto_files: Vec<String>,
    #[serde(default)]
    proto_include: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEvent {
    our_id: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileObject {
    key: Option<String>,
    #[serde(default)]
    create_on: Vec<String>,
    #[serde(default)]
    update_on: Vec<String>,
    #[serde(default)]
    delete_on: Vec<String>,
    parent: Option<String>,
    id: Option<String>,
    parent_id: Option<String>,
    find: FileRequest,
    create: FileRequest,
    update: FileRequest,
    delete: FileRequest,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRequest {
    method: Option<String>,
    path: String,
    #[serde(default)]
    body: Option<toml::Table>,
    results: Option<String>,
}

/// A validated integration.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Where it was read from.
    pub file: PathBuf,
    /// Its name: its mappings, tenants' switches and metrics are filed under it.
    pub name: String,
    /// How to reach the partner.
    pub partner: PartnerSpec,
    /// The protobuf files payloads are read with (compiled at load), if any.
    pub protos: Option<prost_reflect::DescriptorPool>,
    /// The event types it acts on.
    pub events: BTreeMap<String, EventSpec>,
    /// The partner's object types, parents before their children.
    pub objects: Vec<ObjectSpec>,
    /// What `ferry tenant enable` writes after its marker, if the file says.
    pub backfill: Option<BackfillSpec>,
    /// Set when the file declares a webhooks integration (`[webhooks]`): each tenant's events
    /// to its own endpoint, and no partner objects.
    pub webhooks: Option<WebhookSpec>,
}

/// How a webhooks integration writes its deliveries (`[webhooks]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSpec {
    /// The CloudEvents `source` of every event: who sends them (`https://shop.example`).
    pub source: String,
    /// Put before the event type to make the CloudEvents `type` (`com.example.shop.`).
    pub type_prefix: String,
    /// How long one delivery may take; `None` for Ferry's `partner.timeout_ms`.
    pub timeout: Option<Duration>,
}

/// A tenant's backfill: a query of the application's tables, each row written to the outbox as
/// an event of `event_type` with the row's JSON payload (`ferry tenant enable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillSpec {
    /// The event type of each row's event (one the file declares).
    pub event_type: String,
    /// Its aggregate type.
    pub aggregate_type: String,
    /// The page query: `$1` the tenant, `$2` the last key of the page before (empty at
    /// first), `$3` the page size; it returns `key` (text, ascending) and `payload` (jsonb).
    pub query: String,
}

/// How to reach the partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerSpec {
    /// The base URL; `None` for Ferry's own `partner.url`.
    pub url: Option<String>,
    /// The credential, read from the environment variable the file names; `None` for Ferry's
    /// own `partner.token`.
    pub token: Option<String>,
    /// The header the credential goes in.
    pub auth_header: String,
    /// What precedes the credential in it (`Bearer`; empty for none).
    pub auth_scheme: String,
    /// The header that carries the idempotency key.
    pub idempotency_header: String,
    /// How long one request may take; `None` for Ferry's `partner.timeout_ms`.
    pub timeout: Option<Duration>,
}

/// One event type the integration acts on.
#[derive(Debug, Clone)]
pub struct EventSpec {
    /// Where our id of the object is in the payload (required by a REST integration; in a
    /// webhooks integration, the CloudEvents `subject` when given, else the aggregate id).
    pub our_id: Vec<String>,
    /// The protobuf message its payload is, when it comes as bytes.
    pub message: Option<prost_reflect::MessageDescriptor>,
}

/// One object type of the partner.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    /// Its name in the mapping table.
    pub name: String,
    /// Its name in idempotency keys.
    pub key: String,
    /// The event types that create it (found first, so a create is an upsert).
    pub create_on: BTreeSet<String>,
    /// The event types that update it (created if missing).
    pub update_on: BTreeSet<String>,
    /// The event types that delete it.
    pub delete_on: BTreeSet<String>,
    /// The object type it belongs to.
    pub parent: Option<String>,
    /// Where the partner's id is in its answers.
    pub id: Vec<String>,
    /// Where the parent's id is in its answers, if they say.
    pub parent_id: Option<Vec<String>>,
    /// Finding it by our id (the healing lookup).
    pub find: Request,
    /// Creating it.
    pub create: Request,
    /// Replacing its fields.
    pub update: Request,
    /// Deleting it.
    pub delete: Request,
}

impl ObjectSpec {
    /// Whether `event_type` creates or updates it.
    pub fn upserted_by(&self, event_type: &str) -> bool {
        self.create_on.contains(event_type) || self.update_on.contains(event_type)
    }
}

/// One request of an object type.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its method.
    pub method: reqwest::Method,
    /// Its path (and query) after the base URL.
    pub path: Template,
    /// Its JSON body: each field a template.
    pub body: Option<Body>,
    /// For a find: where the list of objects is in the answer (none: the answer is the list).
    pub results: Option<Vec<String>>,
}

/// A request body: a JSON object whose leaves are templates.
#[derive(Debug, Clone)]
pub enum Body {
    /// An object of fields.
    Object(Vec<(String, Body)>),
    /// A list.
    List(Vec<Body>),
    /// A text template.
    Template(Template),
    /// A literal number, boolean or other value.
    Literal(serde_json::Value),
}

impl Spec {
    /// Reads and validates the integration file at `path`, with the process's environment
    /// for the variables it names. Relative paths in it (`payload.proto_include`) are read
    /// from the file's directory.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        Spec::load_with(path, |var| std::env::var(var).ok())
    }

    /// [`Spec::load`] with `env` for the environment.
    pub fn load_with(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            file: path.to_owned(),
            source,
        })?;
        Spec::parse(path, &text, env)
    }

    /// Validates `text`, read from `path`, with `env` for the environment.
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Spec, SpecError> {
        let file: File = toml::from_str(text).map_err(|e| SpecError::Syntax {
            file: path.to_owned(),
            detail: e.to_string().trim_end().to_owned(),
        })?;
        let check = Check {
            file: path,
            env: &env,
        };
        check.name(&file.name)?;
        let partner = check.partner(&file.partner)?;
        let protos = check.protos(&file.payload)?;
        let webhooks = file
            .webhooks
            .as_ref()
            .map(|w| check.webhooks(w))
            .transpose()?;
        let events = check.events(&file.events, protos.as_ref(), webhooks.is_none())?;
        let objects = match webhooks {
            None => check.objects(&file.objects, &events)?,
            Some(_) if !file.objects.is_empty() => {
                return Err(check.invalid(
                    "objects",
                    "a webhooks integration sends each event to its tenant's endpoint: it has no objects",
                ));
            }
            Some(_) => Vec::new(),
        };
        let backfill = check.backfill(file.backfill, &objects, &events, webhooks.is_some())?;
        Ok(Spec {
            file: path.to_owned(),
            name: file.name,
            partner,
            protos,
            events,
            objects,
            backfill,
            webhooks,
        })
    }

    /// What the integration does, for a person: `ferry check-integration` prints it.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{}: integration {:?}, valid\n",
            self.file.display(),
            self.name
        );
        if let Some(w) = &self.webhooks {
            let _ = writeln!(
                out,
                "webhooks: to each tenant's endpoint, source {:?}",
                w.source
            );
            for event in self.events.keys() {
                let _ = writeln!(
                    out,
                    "  {event}: a CloudEvent of type {:?}, signed",
                    format!("{}{event}", w.type_prefix)
                );
            }
            return out;
        }
        let url = self.partner.url.as_deref().unwrap_or("Ferry's partner.url");
        let _ = writeln!(out, "partner: {url}");
        for (event, declared) in &self.events {
            let mut does = Vec::new();
            for o in &self.objects {
                if o.create_on.contains(event) {
                    does.push(format!("create {}", o.name));
                }
                if o.update_on.contains(event) {
                    does.push(format!("update {}", o.name));
                }
            }
            for o in self.objects.iter().rev() {
                if o.delete_on.contains(event) {
                    does.push(format!("delete {}", o.name));
                }
            }
            let _ = writeln!(
                out,
                "  {event} (our id at `{}`): {}",
                declared.our_id.join("."),
                does.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "  TenantIntegrationDisabled: delete every mapped {}",
            self.objects
                .iter()
                .rev()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", then ")
        );
        out
    }

    /// The object type named `name`.
    pub fn object(&self, name: &str) -> Option<&ObjectSpec> {
        self.objects.iter().find(|o| o.name == name)
    }
}

/// Validation, with the file at hand for the errors.
struct Check<'a> {
    file: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Check<'_> {
    fn invalid(&self, key: impl Into<String>, why: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            file: self.file.to_owned(),
            key: key.into(),
            why: why.into(),
        }
    }

    fn name(&self, name: &str) -> Result<(), SpecError> {
        if crate::delivery::is_integration_name(name) {
            Ok(())
        } else {
            Err(self.invalid(
                "name",
                format!("{name:?} must be 1 to 64 of a-z, 0-9, `_` and `-`"),
            ))
        }
    }

    fn partner(&self, p: &FilePartner) -> Result<PartnerSpec, SpecError> {
        let env = |key: &str, var: &str| {
            (self.env)(var).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("the environment variable {var} it names is not set"),
                )
            })
        };
        let url = match (&p.url, &p.url_env) {
            (Some(_), Some(_)) => {
                return Err(self.invalid("partner.url_env", "give `url` or `url_env`, not both"));
            }
            (Some(url), None) => Some(self.url("partner.url", url)?),
            (None, Some(var)) => Some(self.url("partner.url_env", &env("partner.url_env", var)?)?),
            (None, None) => None,
        };
        let token = match &p.token_env {
            Some(var) => Some(env("partner.token_env", var)?),
            None => None,
        };
        let timeout = match &p.timeout {
            Some(t) => Some(humantime::parse_duration(t).map_err(|e| {
                self.invalid(
                    "partner.timeout",
                    format!("{t:?} is not a duration like \"10s\": {e}"),
                )
            })?),
            None => None,
        };
        Ok(PartnerSpec {
            url,
            token,
            auth_header: p
                .auth_header
                .clone()
                .unwrap_or_else(|| "Authorization".into()),
            auth_scheme: p.auth_scheme.clone().unwrap_or_else(|| "Bearer".into()),
            idempotency_header: p
                .idempotency_header
                .clone()
                .unwrap_or_else(|| "Idempotency-Key".into()),
            timeout,
        })
    }

    fn url(&self, key: &str, url: &str) -> Result<String, SpecError> {
        if url.starts_with("http://") || url.starts_with("https://") {
            Ok(url.trim_end_matches('/').to_owned())
        } else {
            Err(self.invalid(key, format!("{url:?} is not an http:// or https:// URL")))
        }
    }

    fn backfill(
        &self,
        b: Option<FileBackfill>,
        objects: &[ObjectSpec],
        events: &BTreeMap<String, EventSpec>,
        webhooks: bool,
    ) -> Result<Option<BackfillSpec>, SpecError> {
        let Some(b) = b else { return Ok(None) };
        if webhooks && !events.contains_key(&b.event_type) {
            return Err(self.invalid(
                "backfill.event_type",
                format!("{:?} is not an event type of `events`", b.event_type),
            ));
        }
        if !webhooks && !objects.iter().any(|o| o.upserted_by(&b.event_type)) {
            return Err(self.invalid(
                "backfill.event_type",
                format!("{:?} creates or updates no object type", b.event_type),
            ));
        }
        if let Some(missing) = ["$1", "$2", "$3"]
            .into_iter()
            .find(|p| !b.query.contains(p))
        {
            return Err(self.invalid(
                "backfill.query",
                format!(
                    "does not use {missing} ($1 the tenant, $2 the last key of the page before, $3 the page size)"
                ),
            ));
        }
        Ok(Some(BackfillSpec {
            aggregate_type: b.aggregate_type.unwrap_or_else(|| b.event_type.clone()),
            event_type: b.event_type,
            query: b.query,
        }))
    }

    fn protos(&self, p: &FilePayload) -> Result<Option<prost_reflect::DescriptorPool>, SpecError> {
        if p.proto_files.is_empty() {
            return Ok(None);
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let include: Vec<PathBuf> = if p.proto_include.is_empty() {
            vec![dir.to_owned()]
        } else {
            p.proto_include.iter().map(|i| dir.join(i)).collect()
        };
        // Named as an import would name them: relative to an include directory.
        let set = protox::compile(&p.proto_files, &include)
            .map_err(|e| self.invalid("payload.proto_files", e.to_string()))?;
        prost_reflect::DescriptorPool::from_file_descriptor_set(set)
            .map(Some)
            .map_err(|e| self.invalid("payload.proto_files", e.to_string()))
    }

    fn webhooks(&self, w: &FileWebhooks) -> Result<WebhookSpec, SpecError> {
        let timeout = match &w.timeout {
            Some(t) => Some(humantime::parse_duration(t).map_err(|e| {
                self.invalid(
                    "webhooks.timeout",
                    format!("{t:?} is not a duration like \"10s\": {e}"),
                )
            })?),
            None => None,
        };
        let source = w.source.clone().unwrap_or_else(|| "ferry".to_owned());
        if source.trim().is_empty() {
            return Err(self.invalid("webhooks.source", "must not be empty (a URI reference)"));
        }
        Ok(WebhookSpec {
            source,
            type_prefix: w.type_prefix.clone().unwrap_or_default(),
            timeout,
        })
    }

    fn events(
        &self,
        events: &BTreeMap<String, FileEvent>,
        protos: Option<&prost_reflect::DescriptorPool>,
        our_id_required: bool,
    ) -> Result<BTreeMap<String, EventSpec>, SpecError> {
        let mut out = BTreeMap::new();
        for (name, e) in events {
            let key = |k: &str| format!("events.{name}.{k}");
            if control::is_control(name) {
                return Err(self.invalid(
                    format!("events.{name}"),
                    "is Ferry's own event (enable and disable are handled for every integration)",
                ));
            }
            let our_id = match &e.our_id {
                Some(path) => field_path(path).map_err(|why| self.invalid(key("our_id"), why))?,
                None if our_id_required => {
                    return Err(self.invalid(
                        key("our_id"),
                        "is required: where our id of the object is in the payload",
                    ));
                }
                None => Vec::new(),
            };
            let message = match (&e.message, protos) {
                (None, _) => None,
                (Some(m), None) => {
                    return Err(self.invalid(
                        key("message"),
                        format!("names {m:?} but `payload.proto_files` is empty"),
                    ));
                }
                (Some(m), Some(pool)) => Some(pool.get_message_by_name(m).ok_or_else(|| {
                    self.invalid(
                        key("message"),
                        format!("no message {m:?} in payload.proto_files"),
                    )
                })?),
            };
            out.insert(name.clone(), EventSpec { our_id, message });
        }
        Ok(out)
    }
}

/// Which placeholders a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Find,
    Create,
    Update,
    Delete,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Find => "find",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }

    fn default_method(self) -> reqwest::Method {
        match self {
            Action::Find => reqwest::Method::GET,
            Action::Create => reqwest::Method::POST,
            Action::Update => reqwest::Method::PUT,
            Action::Delete => reqwest::Method::DELETE,
        }
    }

    /// Why `slot` cannot be used here, if it cannot.
    fn refuses(self, slot: &Slot, has_parent: bool) -> Option<&'static str> {
        match (self, slot) {
            (_, Slot::Tenant | Slot::OurId) | (Action::Update | Action::Delete, Slot::Id) => None,
            (Action::Find | Action::Create, Slot::Id) => {
                Some("`{id}` is the partner's id: known only to update and delete")
            }
            (Action::Create, Slot::ParentId) if has_parent => None,
            (_, Slot::ParentId) => {
                Some("`{parent_id}` is known only to the create of an object type with a parent")
            }
            (Action::Delete, Slot::Payload(_)) => {
                Some("a delete also runs in a tenant's rollback, with no event: no `{payload.…}`")
            }
            (_, Slot::Payload(_)) => None,
        }
    }
}

impl Check<'_> {
    fn objects(
        &self,
        objects: &BTreeMap<String, FileObject>,
        events: &BTreeMap<String, EventSpec>,
    ) -> Result<Vec<ObjectSpec>, SpecError> {
        if objects.is_empty() {
            return Err(self.invalid("objects", "declares no object type"));
        }
        let mut specs = Vec::new();
        for (name, o) in objects {
            specs.push(self.object(name, o, objects, events)?);
        }
        for event in events.keys() {
            let used = specs
                .iter()
                .any(|o| o.upserted_by(event) || o.delete_on.contains(event));
            if !used {
                return Err(self.invalid(
                    format!("events.{event}"),
                    "no object type is created, updated or deleted on it",
                ));
            }
        }
        self.parents_first(specs)
    }

    fn object(
        &self,
        name: &str,
        o: &FileObject,
        all: &BTreeMap<String, FileObject>,
        events: &BTreeMap<String, EventSpec>,
    ) -> Result<ObjectSpec, SpecError> {
        let at = |k: &str| format!("objects.{name}.{k}");
        let on = |k: &str, list: &[String]| -> Result<BTreeSet<String>, SpecError> {
            match list.iter().find(|e| !events.contains_key(*e)) {
                Some(e) => Err(self.invalid(
                    at(k),
                    format!("event type {e:?} has no [events.{e}] (where is our id in it?)"),
                )),
                None => Ok(list.iter().cloned().collect()),
            }
        };
        if let Some(parent) = &o.parent
            && (parent == name || !all.contains_key(parent))
        {
            return Err(self.invalid(
                at("parent"),
                format!("{parent:?} is not another object type"),
            ));
        }
        let has_parent = o.parent.is_some();
        let path = |k: &str, p: &Option<String>| match p {
            Some(p) => field_path(p)
                .map(Some)
                .map_err(|why| self.invalid(at(k), why)),
            None => Ok(None),
        };
        Ok(ObjectSpec {
            name: name.to_owned(),
            key: o.key.clone().unwrap_or_else(|| name.to_owned()),
            create_on: on("create_on", &o.create_on)?,
            update_on: on("update_on", &o.update_on)?,
            delete_on: on("delete_on", &o.delete_on)?,
            parent: o.parent.clone(),
            id: path("id", &o.id)?.unwrap_or_else(|| vec!["id".to_owned()]),
            parent_id: path("parent_id", &o.parent_id)?,
            find: self.request(&at("find"), &o.find, Action::Find, has_parent)?,
            create: self.request(&at("create"), &o.create, Action::Create, has_parent)?,
            update: self.request(&at("update"), &o.update, Action::Update, has_parent)?,
            delete: self.request(&at("delete"), &o.delete, Action::Delete, has_parent)?,
        })
    }

    fn request(
        &self,
        at: &str,
        r: &FileRequest,
        action: Action,
        has_parent: bool,
    ) -> Result<Request, SpecError> {
        let method = match &r.method {
            Some(m) => m.to_ascii_uppercase().parse().map_err(|_| {
                self.invalid(
                    format!("{at}.method"),
                    format!("{m:?} is not an HTTP method"),
                )
            })?,
            None => action.default_method(),
        };
        let path =
            Template::parse(&r.path).map_err(|why| self.invalid(format!("{at}.path"), why))?;
        let needs = match action {
            Action::Find => Some(Slot::OurId),
            Action::Update | Action::Delete => Some(Slot::Id),
            Action::Create => None,
        };
        if let Some(slot) = needs
            && !path.slots().any(|s| *s == slot)
        {
            let which = if slot == Slot::Id { "{id}" } else { "{our_id}" };
            return Err(self.invalid(format!("{at}.path"), format!("must use {which}")));
        }
        self.slots(&format!("{at}.path"), path.slots(), action, has_parent)?;
        let body = match &r.body {
            Some(table) => Some(self.body(
                &format!("{at}.body"),
                &toml::Value::Table(table.clone()),
                action,
                has_parent,
            )?),
            None => None,
        };
        if r.results.is_some() && action != Action::Find {
            return Err(self.invalid(format!("{at}.results"), "only a find answers with a list"));
        }
        let results = match &r.results {
            Some(p) => {
                Some(field_path(p).map_err(|why| self.invalid(format!("{at}.results"), why))?)
            }
            None => None,
        };
        Ok(Request {
            method,
            path,
            body,
            results,
        })
    }

    fn slots<'s>(
        &self,
        at: &str,
        slots: impl Iterator<Item = &'s Slot>,
        action: Action,
        has_parent: bool,
    ) -> Result<(), SpecError> {
        for slot in slots {
            if let Some(why) = action.refuses(slot, has_parent) {
                return Err(self.invalid(at, format!("{} cannot use it: {why}", action.name())));
            }
        }
        Ok(())
    }

    fn body(
        &self,
        at: &str,
        v: &toml::Value,
        action: Action,
        has_parent: bool,
    ) -> Result<Body, SpecError> {
        Ok(match v {
            toml::Value::String(s) => {
                let t = Template::parse(s).map_err(|why| self.invalid(at, why))?;
                self.slots(at, t.slots(), action, has_parent)?;
                Body::Template(t)
            }
            toml::Value::Table(t) => Body::Object(
                t.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            self.body(&format!("{at}.{k}"), v, action, has_parent)?,
                        ))
                    })
                    .collect::<Result<_, SpecError>>()?,
            ),
            toml::Value::Array(items) => Body::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.body(&format!("{at}.{i}"), v, action, has_parent))
                    .collect::<Result<_, _>>()?,
            ),
            other => Body::Literal(
                serde_json::to_value(other).map_err(|e| self.invalid(at, e.to_string()))?,
            ),
        })
    }

    /// The object types, each after its parent; an error if parents go round in a circle. A
    /// child is upserted by no event its parent is not (it needs its parent's id).
    fn parents_first(&self, mut left: Vec<ObjectSpec>) -> Result<Vec<ObjectSpec>, SpecError> {
        let mut ordered: Vec<ObjectSpec> = Vec::new();
        while !left.is_empty() {
            let ready = left.iter().position(|o| match &o.parent {
                None => true,
                Some(p) => ordered.iter().any(|d| &d.name == p),
            });
            let Some(i) = ready else {
                return Err(self.invalid(
                    format!("objects.{}.parent", left[0].name),
                    "the parents go round in a circle",
                ));
            };
            let o = left.remove(i);
            if let Some(parent) = o
                .parent
                .as_ref()
                .and_then(|p| ordered.iter().find(|d| &d.name == p))
                && let Some(e) = o
                    .create_on
                    .union(&o.update_on)
                    .find(|e| !parent.upserted_by(e))
            {
                return Err(self.invalid(
                    format!("objects.{}.create_on", o.name),
                    format!(
                        "{e:?} does not create or update its parent {:?}, whose id it needs",
                        parent.name
                    ),
                ));
            }
            ordered.push(o);
        }
        Ok(ordered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        (var == "PARTNER_TOKEN").then(|| "secret".to_owned())
    }

    const MINIMAL: &str = r#"
name = "crm"
[partner]
url = "http://127.0.0.1:1"
token_env = "PARTNER_TOKEN"
[events.ContactSaved]
our_id = "contact.id"
[events.ContactRemoved]
our_id = "id"
[objects.person]
create_on = ["ContactSaved"]
delete_on = ["ContactRemoved"]
find = { path = "/people?ref={our_id}", results = "items" }
create = { path = "/people", body = { ref = "{our_id}", name = "{payload.contact.name}", vip = true } }
update = { method = "PATCH", path = "/people/{id}", body = { name = "{payload.contact.name}" } }
delete = { path = "/people/{id}" }
"#;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(Path::new("crm.toml"), text, env)
    }

    #[test]
    fn a_minimal_integration_is_read() {
        let spec = parse(MINIMAL).unwrap();
        assert_eq!(spec.name, "crm");
        assert_eq!(spec.partner.token.as_deref(), Some("secret"));
        assert_eq!(spec.partner.idempotency_header, "Idempotency-Key");
        let person = spec.object("person").unwrap();
        assert_eq!(person.update.method, reqwest::Method::PATCH);
        assert_eq!(person.create.method, reqwest::Method::POST);
        assert!(person.upserted_by("ContactSaved"));
        assert!(person.delete_on.contains("ContactRemoved"));
    }

    #[test]
    fn the_webhooks_file_is_a_webhooks_integration_without_objects() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/webhooks.toml");
        let spec = Spec::load_with(&file, |_| None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.name, "webhooks");
        let w = spec.webhooks.as_ref().expect("a webhooks integration");
        assert!(w.type_prefix.ends_with('.'), "{w:?}");
        assert!(spec.objects.is_empty());
        assert!(spec.events["ProductCreated"].message.is_some());
        assert!(spec.describe().contains("a CloudEvent of type"));
    }

    #[test]
    fn a_webhooks_file_is_refused_with_objects_and_a_rest_file_without_our_id() {
        const HOOKS: &str = r#"
name = "hooks"
[webhooks]
source = "https://shop.example"
[events.ContactSaved]
"#;
        // Input tried: a minimal webhooks file (valid), then with an object type added.
        let spec = parse(HOOKS).unwrap();
        assert_eq!(spec.webhooks.unwrap().source, "https://shop.example");
        let with_objects = format!(
            "{HOOKS}{}",
            &MINIMAL[MINIMAL.find("[objects.person]").unwrap()..]
        );
        let e = parse(&with_objects).unwrap_err().to_string();
        assert!(e.contains("`objects`") && e.contains("no objects"), "{e}");
        // Input tried: a REST file whose event names no `our_id`.
        let e = parse(&MINIMAL.replace("our_id = \"id\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`events.ContactRemoved.our_id`: is required"),
            "{e}"
        );
        // Input tried: a timeout that is not a duration.
        let e = parse(&HOOKS.replace("[webhooks]\n", "[webhooks]\ntimeout = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`webhooks.timeout`"), "{e}");
    }

    #[test]
    fn the_shop_integration_file_is_valid_with_its_children_after_their_parents() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/shop.toml");
        let spec = Spec::load_with(&file, |v| (v == "FERRY_PARTNER_TOKEN").then(|| "t".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = spec.objects.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["shop_item", "shop_price"]);
        assert!(spec.events["ProductCreated"].message.is_some());
    }

    #[test]
    fn each_invalid_file_is_refused_naming_the_file_and_the_key() {
        // (what was tried, the change to the minimal file, the key the error must name)
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "a name with capitals",
                r#"name = "crm""#,
                r#"name = "CRM""#,
                "`name`",
            ),
            (
                "a token variable that is not set",
                r#"token_env = "PARTNER_TOKEN""#,
                r#"token_env = "NOPE""#,
                "`partner.token_env`",
            ),
            (
                "a URL without a scheme",
                r#"url = "http://127.0.0.1:1""#,
                r#"url = "127.0.0.1:1""#,
                "`partner.url`",
            ),
            (
                "a timeout that is no duration",
                r#"token_env = "PARTNER_TOKEN""#,
                "token_env = \"PARTNER_TOKEN\"\ntimeout = \"soon\"",
                "`partner.timeout`",
            ),
            (
                "an object on an undeclared event",
                r#"create_on = ["ContactSaved"]"#,
                r#"create_on = ["ContactSavd"]"#,
                "`objects.person.create_on`",
            ),
            (
                "an unknown placeholder",
                "{payload.contact.name}\", vip",
                "{contact.name}\", vip",
                "`objects.person.create.body.name`",
            ),
            (
                "a find without our id",
                "/people?ref={our_id}",
                "/people",
                "`objects.person.find.path`",
            ),
            (
                "a delete without the partner's id",
                r#"delete = { path = "/people/{id}" }"#,
                r#"delete = { path = "/people/x" }"#,
                "`objects.person.delete.path`",
            ),
            (
                "the partner's id in a create",
                r#"create = { path = "/people""#,
                r#"create = { path = "/people/{id}""#,
                "`objects.person.create.path`",
            ),
            (
                "a method that is none",
                r#"method = "PATCH""#,
                r#"method = "PA TCH""#,
                "`objects.person.update.method`",
            ),
            (
                "a parent that does not exist",
                "[objects.person]\n",
                "[objects.person]\nparent = \"org\"\n",
                "`objects.person.parent`",
            ),
            (
                "a protobuf message without proto files",
                r#"our_id = "id""#,
                "our_id = \"id\"\nmessage = \"crm.Removed\"",
                "`events.ContactRemoved.message`",
            ),
            (
                "an event no object uses",
                "[objects.person]",
                "[events.Unused]\nour_id = \"id\"\n[objects.person]",
                "`events.Unused`",
            ),
            (
                "Ferry's own event declared",
                "[objects.person]",
                "[events.TenantIntegrationEnabled]\nour_id = \"id\"\n[objects.person]",
                "`events.TenantIntegrationEnabled`",
            ),
        ];
        for (what, from, to, key) in cases {
            assert!(MINIMAL.contains(from), "{what}: the case does not apply");
            let err = parse(&MINIMAL.replacen(from, to, 1))
                .expect_err(what)
                .to_string();
            assert!(err.starts_with("crm.toml: "), "{what}: {err}");
            assert!(err.contains(key), "{what}: expected {key} in: {err}");
        }
    }

    #[test]
    fn an_unknown_key_is_refused_by_the_parser_naming_it() {
        let err = parse(&MINIMAL.replacen("[partner]", "[partner]\ntokn = \"x\"", 1))
            .expect_err("a misspelt key")
            .to_string();
        assert!(err.starts_with("crm.toml: "), "{err}");
        assert!(err.contains("tokn"), "{err}");
    }

    #[test]
    fn a_child_upserted_without_its_parent_is_refused() {
        let text = format!(
            "{MINIMAL}\n[objects.note]\nparent = \"person\"\ncreate_on = [\"ContactRemoved\"]\n\
             find = {{ path = \"/n?r={{our_id}}\" }}\ncreate = {{ path = \"/n\" }}\n\
             update = {{ path = \"/n/{{id}}\" }}\ndelete = {{ path = \"/n/{{id}}\" }}\n"
        );
        let err = parse(&text)
            .expect_err("a child on an event its parent ignores")
            .to_string();
        assert!(err.contains("`objects.note.create_on`"), "{err}");
    }
}
