//! The partner integration: the consumer's [`Handler`] that mirrors our products as the
//! partner's shop items and prices, through the generic mapping table
//! (`integration_mappings`: our id → theirs, per object type). It says only how to call the
//! partner for each object type ([`Item`], [`Price`]: [`ObjectApi`]); the generic
//! [`Driver`] does the mapping, the healing, the idempotency keys and the deletes.
//!
//! - *Created*: an item, then its price. Each step looks for its object first: by mapping, then,
//!   when an earlier handling may have written (a retry, a redelivery, a parked backlog), by
//!   our id as the partner's `external_id`, so a create that stopped half-way resumes without a
//!   second item, and a lost create response (or a lost mapping row) is healed by finding the
//!   object instead of creating it again.
//! - *Updated*: the mapped objects are replaced; a missing mapping or object is found or created
//!   (drift healed).
//! - *Deleted*: the item (and with it its price) is deleted; nothing to delete is done.
//!
//! Every write carries `Idempotency-Key: <event id>/<step>`, the event's log position and its
//! trace context. A mapping is staged as soon as it is learnt (an item created before its price
//! failed too), so a retry finds it, and the consumer's settlement stage writes it with the
//! event's dedupe record, in its batch ([`crate::mappings`]). Handling an event again whose
//! record was lost with its batch is safe: it counts as possibly written, so every step finds
//! what an earlier attempt wrote (by mapping, else by our id) before it creates anything, and
//! the batches keep each tenant's order, so the events after it are handled again too.

use sqlx::PgPool;

use super::api::{NewShopItem, NewShopPrice, ShopItem, ShopItemUpdate, ShopPrice, ShopPriceUpdate};
use super::client::{Call, PartnerClient, is_not_found};
use super::driver::{Driver, Known, ObjectApi, Remote, db};
use crate::delivery::{Attempt, Failure, FailureClass, Handler, Outcome};
use crate::mappings::Mappings;
use crate::outbox::{BadEventReason, OutboxEvent, control};
use crate::shop::{self, EventPayload, proto};

/// The integration's name in `integration_mappings`.
pub const INTEGRATION: &str = "partner";
/// Object type of an item mapping.
pub const ITEM: &str = "shop_item";
/// Object type of a price mapping.
pub const PRICE: &str = "shop_price";

/// The handler.
#[derive(Debug, Clone)]
pub struct Integration {
    client: PartnerClient,
    pool: PgPool,
    /// Mappings learnt and not yet written with their events' settlements.
    mappings: std::sync::Arc<Mappings>,
}

impl Integration {
    /// The integration over `client`, keeping its mappings in `pool`.
    pub fn new(client: PartnerClient, pool: PgPool) -> Self {
        Integration {
            client,
            pool,
            mappings: std::sync::Arc::default(),
        }
    }

    /// Holds at most `budget` mappings in memory, all tenants together (`consume.mapping_views`).
    pub fn with_mapping_views(mut self, budget: usize) -> Self {
        self.mappings = std::sync::Arc::new(Mappings::with_views(budget));
        self
    }
}

impl Handler for Integration {
    fn integration(&self) -> &str {
        INTEGRATION
    }

    fn admit(&self, event: &OutboxEvent) -> Result<(), BadEventReason> {
        if control::is_control(&event.event_type) {
            return Ok(());
        }
        match shop::decode(event)? {
            Some(_) => Ok(()),
            None => Err(BadEventReason::UnknownEventType(event.event_type.clone())),
        }
    }

    async fn handle(&self, event: &OutboxEvent, attempt: &Attempt) -> Outcome {
        let call = Call::for_event(event, attempt);
        let driver = self.driver(event, &call, attempt.may_have_written());
        if control::is_control(&event.event_type) {
            // The switch changed: the tenant's next event reads it ([`crate::mappings::views`]).
            self.mappings.forget_tenant(event.tenant_id.as_str());
        }
        let result = match event.event_type.as_str() {
            // The backfill's creates follow this event: nothing to send for it.
            control::TENANT_ENABLED => Ok(()),
            // After every earlier event of the tenant: what they created is mapped by now.
            control::TENANT_DISABLED => self.rollback(event, &call).await,
            // Admitted, so a shop event (read again here: admission keeps nothing).
            _ => match shop::decode(event) {
                Ok(Some(payload)) => self.product(&driver, &payload).await,
                Ok(None) => Err(permanent(format!(
                    "unknown event type `{}`",
                    event.event_type
                ))),
                Err(reason) => Err(permanent(reason.to_string())),
            },
        };
        match result {
            Ok(()) => Outcome::Done,
            Err(Refusal::Ignored) => Outcome::Ignored,
            Err(Refusal::Failed(failure)) => Outcome::Failed(failure),
        }
    }

    fn mappings(&self) -> Option<&Mappings> {
        Some(&self.mappings)
    }
}

/// Why an event was not brought to the partner.
enum Refusal {
    /// The tenant has the integration off: recorded as ignored.
    Ignored,
    /// The partner or our database failed.
    Failed(Failure),
}

impl From<Failure> for Refusal {
    fn from(failure: Failure) -> Self {
        Refusal::Failed(failure)
    }
}

fn permanent(message: String) -> Refusal {
    Refusal::Failed(Failure::new(FailureClass::Permanent, message))
}

impl Integration {
    /// A product event: its item and price brought to the event's state, or deleted.
    async fn product(&self, driver: &Driver<'_>, payload: &EventPayload) -> Result<(), Refusal> {
        let known = driver.known(payload.product_id(), &[ITEM, PRICE]).await?;
        if !known.enabled {
            return Err(Refusal::Ignored);
        }
        match payload {
            EventPayload::ProductCreated(proto::ProductCreated { product: Some(p) })
            | EventPayload::ProductUpdated(proto::ProductUpdated { product: Some(p) }) => {
                Ok(self.upsert(driver, p, known).await?)
            }
            EventPayload::ProductDeleted(d) => {
                Ok(self.delete(driver, &d.product_id, known).await?)
            }
            // Refused at admission.
            _ => Err(permanent("the event carries no product".to_owned())),
        }
    }
}

impl Integration {
    /// The tenant's rollback: every object mapped for it is deleted on the partner (prices
    /// before items), each mapping row removed once its object is gone, so a retry resumes
    /// where this stopped; then whatever Ferry created that no mapping names (our id in
    /// `external_id`: a lost mapping row) is swept. Not found counts as deleted.
    async fn rollback(&self, event: &OutboxEvent, call: &Call) -> Result<(), Refusal> {
        let driver = self.driver(event, call, true);
        for object_type in [PRICE, ITEM] {
            let mut objects = driver.tenant_objects(object_type);
            loop {
                let page = objects.next_page().await.map_err(db)?;
                if page.is_empty() {
                    break;
                }
                for (local_id, foreign_id) in page {
                    self.delete_object(call, event, object_type, &local_id, &foreign_id)
                        .await?;
                    driver.forget(object_type, &local_id);
                }
            }
        }
        for price in self.client.list_prices(call).await? {
            if !price.external_id.is_empty() {
                self.delete_object(call, event, PRICE, &price.external_id, &price.id)
                    .await?;
            }
        }
        for item in self.client.list_items(call).await? {
            if !item.external_id.is_empty() {
                self.delete_object(call, event, ITEM, &item.external_id, &item.id)
                    .await?;
            }
        }
        Ok(())
    }

    async fn delete_object(
        &self,
        call: &Call,
        event: &OutboxEvent,
        object_type: &str,
        local_id: &str,
        foreign_id: &str,
    ) -> Result<(), Failure> {
        let call = call.keyed(format!("{}/rollback/{object_type}/{local_id}", event.id));
        let deleted = if object_type == PRICE {
            self.client.delete_price(&call, foreign_id).await
        } else {
            self.client.delete_item(&call, foreign_id).await
        };
        match deleted {
            Ok(()) => Ok(()),
            Err(f) if is_not_found(&f) => Ok(()),
            Err(f) => Err(f),
        }
    }
    /// The product's item, then its price, each through the generic driver.
    async fn upsert(
        &self,
        driver: &Driver<'_>,
        p: &proto::Product,
        known: Known,
    ) -> Result<(), Failure> {
        let item = Item {
            client: &self.client,
            product: p,
        };
        let item_id = driver.upsert(&item, &p.id, known.of(ITEM), None).await?;
        let price = Price {
            client: &self.client,
            product: p,
        };
        driver
            .upsert(&price, &p.id, known.of(PRICE), Some(&item_id))
            .await?;
        Ok(())
    }

    /// The product's item (and with it, on the partner, its price), then both mappings.
    async fn delete(
        &self,
        driver: &Driver<'_>,
        product_id: &str,
        known: Known,
    ) -> Result<(), Failure> {
        let item = Item {
            client: &self.client,
            product: &proto::Product {
                id: product_id.to_owned(),
                ..proto::Product::default()
            },
        };
        driver.delete(&item, product_id, known.of(ITEM)).await?;
        // The partner deleted the item's price with it.
        driver.forget(PRICE, product_id);
        Ok(())
    }

    fn driver<'a>(&'a self, event: &'a OutboxEvent, call: &'a Call, heal: bool) -> Driver<'a> {
        Driver {
            pool: &self.pool,
            integration: INTEGRATION,
            mappings: &self.mappings,
            tenant: event.tenant_id.as_str(),
            event_id: event.id,
            call,
            heal,
        }
    }
}

/// A product as the partner's shop item.
struct Item<'a> {
    client: &'a PartnerClient,
    product: &'a proto::Product,
}

impl Item<'_> {
    fn fields(&self) -> ShopItemUpdate {
        ShopItemUpdate {
            name: self.product.name.clone(),
            description: self.product.description.clone(),
        }
    }

    fn remote(&self, item: ShopItem) -> Remote {
        Remote {
            current: item.name == self.product.name && item.description == self.product.description,
            id: item.id,
            parent: None,
        }
    }
}

impl ObjectApi for Item<'_> {
    fn object_type(&self) -> &str {
        ITEM
    }

    fn key(&self) -> &str {
        "item"
    }

    async fn find(&self, call: &Call, our_id: &str) -> Result<Option<Remote>, Failure> {
        let found = self.client.find_item(call, our_id).await?;
        Ok(found.map(|item| self.remote(item)))
    }

    async fn create(
        &self,
        call: &Call,
        our_id: &str,
        _parent: Option<&str>,
    ) -> Result<Remote, Failure> {
        let new = NewShopItem {
            name: self.product.name.clone(),
            description: self.product.description.clone(),
            external_id: our_id.to_owned(),
        };
        let item = self.client.create_item(call, &new).await?;
        Ok(self.remote(item))
    }

    async fn update(&self, call: &Call, id: &str) -> Result<Remote, Failure> {
        let item = self.client.update_item(call, id, &self.fields()).await?;
        Ok(self.remote(item))
    }

    async fn delete(&self, call: &Call, id: &str) -> Result<(), Failure> {
        self.client.delete_item(call, id).await
    }
}

/// A product's price as the partner's shop price, under its item.
struct Price<'a> {
    client: &'a PartnerClient,
    product: &'a proto::Product,
}

impl Price<'_> {
    fn remote(&self, price: ShopPrice) -> Remote {
        Remote {
            current: price.amount_minor == self.product.price_minor
                && price.currency == self.product.currency,
            id: price.id,
            parent: Some(price.item_id),
        }
    }
}

impl ObjectApi for Price<'_> {
    fn object_type(&self) -> &str {
        PRICE
    }

    fn key(&self) -> &str {
        "price"
    }

    async fn find(&self, call: &Call, our_id: &str) -> Result<Option<Remote>, Failure> {
        let found = self.client.find_price(call, our_id).await?;
        Ok(found.map(|price| self.remote(price)))
    }

    async fn create(
        &self,
        call: &Call,
        our_id: &str,
        parent: Option<&str>,
    ) -> Result<Remote, Failure> {
        let new = NewShopPrice {
            item_id: parent.unwrap_or_default().to_owned(),
            amount_minor: self.product.price_minor,
            currency: self.product.currency.clone(),
            external_id: our_id.to_owned(),
        };
        let price = self.client.create_price(call, &new).await?;
        Ok(self.remote(price))
    }

    async fn update(&self, call: &Call, id: &str) -> Result<Remote, Failure> {
        let amount = ShopPriceUpdate {
            amount_minor: self.product.price_minor,
            currency: self.product.currency.clone(),
        };
        let price = self.client.update_price(call, id, &amount).await?;
        Ok(self.remote(price))
    }

    async fn delete(&self, call: &Call, id: &str) -> Result<(), Failure> {
        self.client.delete_price(call, id).await
    }
}
