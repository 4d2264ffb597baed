//! docker-compose.yml's Debezium connector must emit exactly the wire contract the decoder
//! reads: one topic, key = tenant_id, the contract's headers, the payload bytes untouched.

use ferry::outbox::header;
use serde_json::Value;

fn connector() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/debezium/outbox-connector.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("connector JSON")
}

#[test]
fn the_debezium_connector_is_configured_for_the_wire_contract() {
    let c = connector();
    let config = &c["config"];
    let get = |k: &str| {
        config[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is not set"))
    };

    assert_eq!(
        get("transforms.outbox.type"),
        "io.debezium.transforms.outbox.EventRouter"
    );
    assert_eq!(get("table.include.list"), "public.outbox");
    // One topic for every event, so a tenant's order holds across aggregate types.
    assert_eq!(
        get("transforms.outbox.route.topic.replacement"),
        ferry::config::DEFAULT_TOPIC
    );
    assert_eq!(get("transforms.outbox.table.field.event.key"), "tenant_id");
    assert_eq!(get("transforms.outbox.table.field.event.id"), "id");
    assert_eq!(
        get("transforms.outbox.table.field.event.payload"),
        "payload"
    );

    let placement: Vec<(String, String)> =
        get("transforms.outbox.table.fields.additional.placement")
            .split(',')
            .map(|p| {
                let parts: Vec<&str> = p.split(':').collect();
                assert_eq!(parts.len(), 3, "{p}");
                assert_eq!(parts[1], "header", "{p} must be placed in a header");
                (parts[0].to_owned(), parts[2].to_owned())
            })
            .collect();
    let expected = [
        ("type", header::EVENT_TYPE),
        ("aggregatetype", header::AGGREGATE_TYPE),
        ("aggregateid", header::AGGREGATE_ID),
        ("traceparent", header::TRACEPARENT),
        ("deliver_before", header::DELIVER_BEFORE),
        ("integration", header::INTEGRATION),
    ];
    for (column, name) in expected {
        assert!(
            placement.contains(&(column.to_owned(), name.to_owned())),
            "column {column} must become header {name}: {placement:?}"
        );
    }
    // The key and the headers as raw text, the protobuf payload as raw bytes.
    assert_eq!(
        get("key.converter"),
        "org.apache.kafka.connect.storage.StringConverter"
    );
    // BinaryDataConverter: the bytea payload's bytes as they are (ByteArrayConverter's output
    // for a bytes field), and the heartbeat's records through its delegate.
    assert_eq!(
        get("value.converter"),
        "io.debezium.converters.BinaryDataConverter"
    );
    // A heartbeat keeps the slot moving while the outbox is quiet; a replication role, not the
    // superuser, reads it. The record's time stays the source's, the transaction's commit:
    // `table.field.event.timestamp` would need an INT64 column (a timestamptz stops the task).
    assert_eq!(get("heartbeat.interval.ms"), "10000");
    assert_eq!(get("database.user"), "debezium");
    assert!(
        get("database.password").starts_with("${file:"),
        "no password in the file"
    );
    assert!(
        config
            .get("transforms.outbox.table.field.event.timestamp")
            .is_none(),
        "the commit time, not a column"
    );
    assert_eq!(
        get("header.converter"),
        "org.apache.kafka.connect.storage.SimpleHeaderConverter"
    );
}

#[test]
fn docker_compose_registers_this_connector() {
    let compose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
            .unwrap();
    assert!(compose.contains("./deploy/debezium/outbox-connector.json:/connector.json"));
    assert!(compose.contains("wal_level=logical"));
    assert_eq!(connector()["name"], "ferry-outbox");
}
