//! LoRA adapters: PEFT files on disk, their identity, the registry and host cache, and the
//! per-step batch description that heterogeneous kernels consume.

pub mod batch;
pub mod host;
pub mod ids;
pub mod peft;
pub mod registry;

use serde::{Deserialize, Serialize};

/// The seven linear modules of a Llama-family decoder layer that an adapter may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Module {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [
        Module::Q,
        Module::K,
        Module::V,
        Module::O,
        Module::Gate,
        Module::Up,
        Module::Down,
    ];

    /// The module's attribute name in Hugging Face checkpoints (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Module::Q => "q_proj",
            Module::K => "k_proj",
            Module::V => "v_proj",
            Module::O => "o_proj",
            Module::Gate => "gate_proj",
            Module::Up => "up_proj",
            Module::Down => "down_proj",
        }
    }

    /// The submodule that holds it: `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Module::Q | Module::K | Module::V | Module::O => "self_attn",
            Module::Gate | Module::Up | Module::Down => "mlp",
        }
    }

    /// Dotted path inside the base model, as PEFT matches `target_modules` and
    /// `rank_pattern` against it: `model.layers.{layer}.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }

    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Position in [`Module::ALL`], for dense per-module tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What LoRA needs to know of the base model: its depth and the `(in_features, out_features)`
/// of each linear module, as PEFT sees them. The model implements it (`model::config`), so
/// adapters are validated against a model without this module depending on the model's.
pub trait BaseShapes {
    fn num_layers(&self) -> usize;
    fn module_shape(&self, module: Module) -> (usize, usize);
}

impl<T: BaseShapes + ?Sized> BaseShapes for &T {
    fn num_layers(&self) -> usize {
        (**self).num_layers()
    }

    fn module_shape(&self, module: Module) -> (usize, usize) {
        (**self).module_shape(module)
    }
}
