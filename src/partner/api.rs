//! The partner's objects and errors as they travel over HTTP, shared by the client and the
//! simulator.

use serde::{Deserialize, Serialize};

/// A shop item on the partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShopItem {
    /// The partner's id (`item_…`).
    pub id: String,
    /// The item's name.
    pub name: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
    /// Our id for it (the product id), searchable.
    pub external_id: String,
}

/// The body that creates an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewShopItem {
    /// The item's name.
    pub name: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
    /// Our id for it.
    pub external_id: String,
}

/// The body that replaces an item's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShopItemUpdate {
    /// The item's name.
    pub name: String,
    /// Its description.
    #[serde(default)]
    pub description: String,
}

/// A price of a shop item on the partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShopPrice {
    /// The partner's id (`price_…`).
    pub id: String,
    /// The item it prices.
    pub item_id: String,
    /// The amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Our id for it (the product id), searchable.
    pub external_id: String,
}

/// The body that creates a price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewShopPrice {
    /// The item it prices.
    pub item_id: String,
    /// The amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Our id for it.
    pub external_id: String,
}

/// The body that replaces a price's amount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShopPriceUpdate {
    /// The amount in minor units.
    pub amount_minor: i64,
    /// ISO 4217 currency.
    pub currency: String,
}

/// A list answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T> {
    /// The objects.
    pub data: Vec<T>,
}

/// The partner's error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable code (`not_found`, `validation_failed`, ...).
    pub code: String,
    /// A message for people.
    pub message: String,
}

/// The header that carries the event's place in the log (`partition/offset`), so the partner
/// (the simulator) can tell whether a tenant's requests arrived in order.
pub const POSITION_HEADER: &str = "ferry-position";
