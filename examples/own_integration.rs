//! Your own integration in Rust, with Ferry as a library: mirror each tenant's products as the
//! partner's shop items (names only; no prices), through Ferry's generic driver, and run it
//! under Ferry's consumer (ordering per tenant, retries, pausing, parking, offsets).
//!
//! The integration says only how to call the partner for its one object type ([`Item`]:
//! find by our id, create, update, delete); the [`Driver`] does the mapping of our ids to
//! theirs, the healing (find before create), the idempotency keys and the deletes.
//!
//! Run it against the partner simulator (`ferry partner-sim`) with the usual settings:
//!
//! ```sh
//! FERRY_PARTNER_URL=http://127.0.0.1:8081 FERRY_PARTNER_TOKEN=sim-token \
//!   cargo run --example own_integration
//! ```
//!
//! `tests/it/example.rs` runs this handler end to end against the simulator.

use std::sync::Arc;

use ferry::delivery::{Attempt, Failure, FailureClass, Handler, Outcome};
use ferry::mappings::Mappings;
use ferry::outbox::OutboxEvent;
use ferry::partner::api::{NewShopItem, ShopItem, ShopItemUpdate};
use ferry::partner::client::{Call, PartnerClient};
use ferry::partner::driver::{Driver, ObjectApi, Remote};
use ferry::shop::{self, EventPayload, proto};

/// The integration's name in Ferry's mapping table: its mappings are its own.
pub const INTEGRATION: &str = "names";

/// The handler: one event, one object.
pub struct NamesOnly {
    pub client: PartnerClient,
    pub pool: sqlx::PgPool,
    /// The mappings the driver learns, until the consumer writes them with their events'
    /// settlements.
    pub mappings: Mappings,
}

impl Handler for NamesOnly {
    fn integration(&self) -> &str {
        INTEGRATION
    }

    async fn handle(&self, event: &OutboxEvent, attempt: &Attempt) -> Outcome {
        let call = Call {
            account: event.tenant_id.to_string(),
            ..Call::default()
        };
        let driver = Driver {
            pool: &self.pool,
            integration: INTEGRATION,
            mappings: &self.mappings,
            tenant: event.tenant_id.as_str(),
            event_id: event.id,
            call: &call,
            // A retry, or a redelivery: look for our id on the partner before creating.
            heal: attempt.may_have_written(),
        };
        // The shop's events, read from their protobuf or JSON payload; any other type is not
        // this integration's.
        let payload = match shop::decode(event) {
            Ok(Some(payload)) => payload,
            Ok(None) => return Outcome::Ignored,
            Err(reason) => {
                return Outcome::Failed(Failure::new(FailureClass::Permanent, reason.to_string()));
            }
        };
        let done = match &payload {
            EventPayload::ProductCreated(proto::ProductCreated { product: Some(p) })
            | EventPayload::ProductUpdated(proto::ProductUpdated { product: Some(p) }) => {
                let item = Item {
                    client: &self.client,
                    name: &p.name,
                };
                match driver.known(&p.id, &["named_item"]).await {
                    Ok(known) => driver
                        .upsert(&item, &p.id, known.of("named_item"), None)
                        .await
                        .map(drop),
                    Err(f) => Err(f),
                }
            }
            EventPayload::ProductDeleted(d) => {
                let item = Item {
                    client: &self.client,
                    name: "",
                };
                match driver.known(&d.product_id, &["named_item"]).await {
                    Ok(known) => {
                        driver
                            .delete(&item, &d.product_id, known.of("named_item"))
                            .await
                    }
                    Err(f) => Err(f),
                }
            }
            // A create or update without its product.
            _ => return Outcome::Ignored,
        };
        match done {
            Ok(()) => Outcome::Done,
            Err(failure) => Outcome::Failed(failure),
        }
    }

    fn mappings(&self) -> Option<&Mappings> {
        Some(&self.mappings)
    }
}

/// A product as the partner's shop item, holding only its name.
pub struct Item<'a> {
    client: &'a PartnerClient,
    name: &'a str,
}

impl Item<'_> {
    fn remote(&self, item: ShopItem) -> Remote {
        Remote {
            current: item.name == self.name,
            id: item.id,
            parent: None,
        }
    }
}

impl ObjectApi for Item<'_> {
    fn object_type(&self) -> &str {
        "named_item"
    }

    fn key(&self) -> &str {
        "named_item"
    }

    async fn find(&self, call: &Call, our_id: &str) -> Result<Option<Remote>, Failure> {
        Ok(self
            .client
            .find_item(call, our_id)
            .await?
            .map(|i| self.remote(i)))
    }

    async fn create(
        &self,
        call: &Call,
        our_id: &str,
        _parent: Option<&str>,
    ) -> Result<Remote, Failure> {
        let new = NewShopItem {
            name: self.name.to_owned(),
            description: String::new(),
            external_id: our_id.to_owned(),
        };
        Ok(self.remote(self.client.create_item(call, &new).await?))
    }

    async fn update(&self, call: &Call, id: &str) -> Result<Remote, Failure> {
        let fields = ShopItemUpdate {
            name: self.name.to_owned(),
            description: String::new(),
        };
        Ok(self.remote(self.client.update_item(call, id, &fields).await?))
    }

    async fn delete(&self, call: &Call, id: &str) -> Result<(), Failure> {
        self.client.delete_item(call, id).await
    }
}

/// Ferry's consumer with this handler, configured like `ferry consume` (file and `FERRY_*`).
#[allow(dead_code)] // the test includes this file for its handler, not its main
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ferry::config::Config::load(None)?;
    let pool = ferry::store::connect(&config.database).await?;
    ferry::store::migrate(&pool).await?;
    let handler = Arc::new(NamesOnly {
        client: PartnerClient::new(&config.partner)?,
        pool: pool.clone(),
        mappings: Mappings::default(),
    });
    let stats = Arc::new(ferry::consumer::runtime::ConsumeStats::default());
    ferry::consumer::runtime::run(
        &config,
        pool,
        handler,
        ferry::consumer::runtime::ConsumeOptions::configured(&config.consume),
        stats,
        ferry::shutdown::on_signals()?,
    )
    .await?;
    Ok(())
}
