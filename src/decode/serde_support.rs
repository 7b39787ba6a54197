//! Field deserializers named by the serde attributes that build.rs puts on the generated
//! webhook messages.

use serde::{Deserialize, Deserializer};

/// A non-nullable field: `null` reads as the default, as in the proto3 JSON mapping.
pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// An opaque object (`APNS`, `Options`, `Permissions`, `Fields`): any JSON, kept as
/// `google.protobuf.Value`; `null` reads as unset.
pub fn opaque<'de, D>(deserializer: D) -> Result<Option<prost_types::Value>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    if value
        .as_ref()
        .is_some_and(|value| !super::tolerant::depth_fits(value))
    {
        // The tolerant decode cuts it, with a deviation naming where (DESIGN invariant 9).
        return Err(serde::de::Error::custom(format!(
            "nested deeper than {} protobuf levels, which stock decoders refuse",
            super::MAX_VALUE_DEPTH
        )));
    }
    Ok(value.map(to_value))
}

fn to_value(json: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        // google.protobuf.Value holds numbers as doubles; the exact text stays in the raw JSON.
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(fields) => Kind::StructValue(prost_types::Struct {
            fields: fields.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A singular message field: a JSON object, or `null`/absent for unset. serde would also read a
/// struct from an array, positionally; a webhook object is never an array, so that is rejected.
pub fn object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Object<T>>::deserialize(deserializer)?.map(|object| object.0))
}

/// A repeated message field: an array of JSON objects; `null` reads as empty.
pub fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let items = Option::<Vec<Object<T>>>::deserialize(deserializer)?.unwrap_or_default();
    Ok(items.into_iter().map(|object| object.0).collect())
}

/// A message read only from a JSON object.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Only(std::marker::PhantomData))
            .map(Object)
    }
}
