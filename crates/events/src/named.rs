//! [`named_enum!`]: an enum tagged by `type` whose names are written once.

/// Declares an enum serialized as `{"type": ..., "data": ...}` (the caller gives the derives and
/// `#[serde(tag = "type", content = "data")]`) from one table of `Variant(...) = "type.name"`
/// (or `Variant { ... } = "type.name"`) entries. Each name becomes the variant's
/// `#[serde(rename)]`, the arm of `type_name()` and an entry of `TYPE_NAMES`, so the three cannot
/// disagree.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// mozaiks_events::named_enum! {
///     #[derive(Debug, Serialize, Deserialize)]
///     #[serde(tag = "type", content = "data")]
///     pub enum Thing {
///         /// A doc comment stays on its variant.
///         Made(String) = "thing.made",
///         Moved { to: u32 } = "thing.moved",
///     }
/// }
///
/// assert_eq!(Thing::Moved { to: 1 }.type_name(), "thing.moved");
/// assert_eq!(Thing::TYPE_NAMES, ["thing.made", "thing.moved"]);
/// let json = serde_json::to_value(Thing::Made("x".into())).unwrap();
/// assert_eq!(json["type"], "thing.made");
/// ```
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$variant_meta:meta])*
                $variant:ident $body:tt = $type_name:literal
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $(
                $(#[$variant_meta])*
                #[serde(rename = $type_name)]
                $variant $body,
            )*
        }

        impl $name {
            /// Every type name, in declaration order.
            pub const TYPE_NAMES: [&'static str; [$($type_name),*].len()] = [$($type_name),*];

            /// The contract name of the variant's type (its `type` on the wire).
            pub fn type_name(&self) -> &'static str {
                match self {
                    $( Self::$variant { .. } => $type_name, )*
                }
            }
        }
    };
}
