//! PEFT's on-disk LoRA format: `adapter_config.json` and the tensor names in
//! `adapter_model.safetensors`, with PEFT's rules for resolving per-module rank and alpha.

use std::fmt;
use std::marker::PhantomData;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::lora::Module;

/// File names of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's pickle weights, which are never read (unpickling runs code).
pub const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// The one refusal of a pickle-only adapter, wherever it is found (the admin API's source
/// check and the loader behind `--adapters` both say this, with a 400).
pub const PICKLE_REFUSED: &str =
    "pickle .bin weights are not supported; save the adapter with safetensors";

/// `target_modules` is a list of module names, or one regular expression string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// `adapter_config.json` as PEFT writes it for a LoRA adapter. Fields the engine cannot honour
/// are parsed so they can be refused by name rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    #[serde(default)]
    pub alpha_pattern: OrderedMap<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub inference_mode: bool,
}

fn default_bias() -> String {
    "none".to_owned()
}

/// A JSON object kept in file order. PEFT tries `rank_pattern` / `alpha_pattern` keys in
/// insertion order and the first match wins, so sorting the keys would change ranks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OrderedMap<T>(pub Vec<(String, T)>);

impl<T> OrderedMap<T> {
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T> FromIterator<(String, T)> for OrderedMap<T> {
    fn from_iter<I: IntoIterator<Item = (String, T)>>(iter: I) -> Self {
        OrderedMap(iter.into_iter().collect())
    }
}

impl<T: Serialize> Serialize for OrderedMap<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OrderedMap<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = OrderedMap<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of module patterns")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(OrderedMap(out))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
        }
        deserializer.deserialize_any(Visitor(PhantomData))
    }
}

/// PEFT's rule for a pattern key (`get_pattern_key`): the key matches a module path when the
/// path ends with it at a dot boundary, the key read as a regular expression.
pub fn pattern_matches(pattern: &str, module_path: &str) -> bool {
    if module_path == pattern || module_path.ends_with(&format!(".{pattern}")) {
        return true;
    }
    Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).is_ok_and(|re| re.is_match(module_path))
}

impl AdapterConfig {
    /// Whether the adapter targets `module` of `layer` (PEFT's `check_target_module_exists`).
    pub fn targets(&self, module: Module, layer: usize) -> bool {
        let path = module.path(layer);
        match &self.target_modules {
            TargetModules::List(names) => names
                .iter()
                .any(|n| path == *n || path.ends_with(&format!(".{n}"))),
            TargetModules::Regex(re) => {
                Regex::new(&format!("^(?:{re})$")).is_ok_and(|re| re.is_match(&path))
            }
        }
    }

    /// Rank of `module` in `layer`: the first matching `rank_pattern` key, else `r`.
    pub fn rank_for(&self, module: Module, layer: usize) -> usize {
        let path = module.path(layer);
        self.rank_pattern
            .iter()
            .find(|(pattern, _)| pattern_matches(pattern, &path))
            .map_or(self.r, |(_, r)| *r)
    }

    /// Alpha of `module` in `layer`: the first matching `alpha_pattern` key, else `lora_alpha`.
    pub fn alpha_for(&self, module: Module, layer: usize) -> f64 {
        let path = module.path(layer);
        self.alpha_pattern
            .iter()
            .find(|(pattern, _)| pattern_matches(pattern, &path))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }

    /// The LoRA scale `s` in `y = xW + s·(xA)B`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: Module, layer: usize) -> f32 {
        let r = self.rank_for(module, layer) as f64;
        let alpha = self.alpha_for(module, layer);
        let scale = if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        scale as f32
    }
}

/// PEFT's tensor name for the A (`lora_A`) or B (`lora_B`) matrix of a module.
pub fn tensor_name(module: Module, layer: usize, matrix: Matrix) -> String {
    format!(
        "base_model.model.{}.{}.weight",
        module.path(layer),
        matrix.peft_name()
    )
}

/// The two LoRA factors: A is `[r, in]`, B is `[out, r]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    A,
    B,
}

impl Matrix {
    pub fn peft_name(self) -> &'static str {
        match self {
            Matrix::A => "lora_A",
            Matrix::B => "lora_B",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> AdapterConfig {
        serde_json::from_str(json).expect("valid config")
    }

    #[test]
    fn rank_pattern_matches_peft_suffix_rules() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj","v_proj"],
                "rank_pattern":{"model.layers.1.self_attn.q_proj":32,"v_proj":4},
                "alpha_pattern":{"layers.0.self_attn.q_proj":64}}"#,
        );
        assert_eq!(c.rank_for(Module::Q, 0), 8);
        assert_eq!(c.rank_for(Module::Q, 1), 32);
        assert_eq!(
            c.rank_for(Module::Q, 11),
            8,
            "layers.1 must not match layers.11"
        );
        assert_eq!(c.rank_for(Module::V, 3), 4);
        assert_eq!(c.alpha_for(Module::Q, 0), 64.0);
        assert_eq!(c.alpha_for(Module::Q, 10), 16.0);
        assert_eq!(c.scale_for(Module::Q, 0), 8.0);
        assert!(c.targets(Module::Q, 5) && c.targets(Module::V, 0));
        assert!(!c.targets(Module::K, 0));
    }

    #[test]
    fn patterns_are_tried_in_file_order() {
        let c = config(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["up_proj"],
                "rank_pattern":{"up_proj":6,"mlp\\..*_proj":2}}"#,
        );
        assert_eq!(
            c.rank_for(Module::Up, 0),
            6,
            "the first matching key wins, as in PEFT"
        );
        assert_eq!(c.rank_for(Module::Down, 0), 2);
        let round: AdapterConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round.rank_pattern, c.rank_pattern);
    }

    #[test]
    fn regex_targets_and_rslora_scale() {
        let c = config(
            r#"{"peft_type":"LORA","r":16,"lora_alpha":8,"use_rslora":true,
                "target_modules":".*\\.(up|down)_proj"}"#,
        );
        assert!(c.targets(Module::Up, 2) && c.targets(Module::Down, 0));
        assert!(!c.targets(Module::Gate, 0));
        assert_eq!(c.scale_for(Module::Up, 0), 2.0);
    }

    #[test]
    fn tensor_names_follow_peft() {
        assert_eq!(
            tensor_name(Module::Gate, 3, Matrix::B),
            "base_model.model.model.layers.3.mlp.gate_proj.lora_B.weight"
        );
    }
}
