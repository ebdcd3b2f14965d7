//! The merged-weights baseline (S-LoRA's "vLLM-packed", time-multiplexed on one model): one
//! adapter at a time is merged into the base weights and only its requests are served; between
//! adapters the weights are swapped, and the swap is really computed and timed.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};

use loraplane_agent::lora::Module;
use loraplane_agent::lora::host::HostAdapter;
use loraplane_agent::model::config::ModelConfig;
use loraplane_agent::model::loader::Checkpoint;

use crate::suites::sim::{Admitted, Job, Policy};

/// The base weights of the modules adapters target, `[out, in]`, as the merge reads them.
pub(super) struct BaseWeights {
    layers: Vec<[Option<Tensor>; 7]>,
}

impl BaseWeights {
    /// Reads the targeted modules' weights from the checkpoint in `dir`.
    pub fn load(dir: &Path, config: &ModelConfig, targets: &[Module]) -> anyhow::Result<Self> {
        let ckpt = Checkpoint::open(dir)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let mut row: [Option<Tensor>; 7] = Default::default();
            for &m in targets {
                let (fan_in, fan_out) = config.module_shape(m);
                let data = ckpt.tensor(&format!("{}.weight", m.path(l)), &[fan_out, fan_in])?;
                row[m.index()] = Some(Tensor::from_vec(data, (fan_out, fan_in), &Device::Cpu)?);
            }
            layers.push(row);
        }
        Ok(BaseWeights { layers })
    }
}

/// The merged baseline's admission policy and weight swapper.
pub(super) struct Merged<'a> {
    base: &'a BaseWeights,
    hosts: &'a [Arc<HostAdapter>],
    /// The weights being served: the base with the current adapter merged in.
    serving: Vec<[Option<Tensor>; 7]>,
    current: Option<usize>,
    pub swaps: usize,
}

impl<'a> Merged<'a> {
    pub fn new(base: &'a BaseWeights, hosts: &'a [Arc<HostAdapter>]) -> Self {
        Merged {
            base,
            hosts,
            serving: Vec::new(),
            current: None,
            swaps: 0,
        }
    }

    /// Merges adapter `a` into a fresh copy of the targeted base weights
    /// (`W' = W + s·B·A`, module by module) and returns the seconds it took.
    fn swap_to(&mut self, a: usize) -> anyhow::Result<f64> {
        let t = Instant::now();
        let host = self
            .hosts
            .get(a)
            .ok_or_else(|| anyhow::anyhow!("no adapter {a}"))?;
        let mut serving: Vec<[Option<Tensor>; 7]> =
            vec![Default::default(); self.base.layers.len()];
        for (l, m, w) in host.modules() {
            let Some(base) = self.base.layers.get(l).and_then(|r| r[m.index()].as_ref()) else {
                anyhow::bail!("adapter targets {} of layer {l}, not loaded", m.name());
            };
            let (fan_out, fan_in) = base.dims2()?;
            let a_mat = Tensor::from_slice(&w.a, (w.rank, fan_in), &Device::Cpu)?;
            let bt = Tensor::from_slice(&w.bt, (w.rank, fan_out), &Device::Cpu)?;
            let delta = bt.t()?.matmul(&a_mat)?;
            serving[l][m.index()] = Some((base + (delta * f64::from(w.scale))?)?);
        }
        self.serving = serving;
        self.swaps += 1;
        Ok(t.elapsed().as_secs_f64())
    }
}

impl Policy for Merged<'_> {
    fn admit(
        &mut self,
        queue: &mut VecDeque<usize>,
        jobs: &[Job],
        engine_busy: bool,
    ) -> anyhow::Result<Admitted> {
        let current = self.current;
        let take = |queue: &mut VecDeque<usize>, adapter: Option<usize>| {
            let (mine, rest): (Vec<usize>, Vec<usize>) =
                queue.drain(..).partition(|i| jobs[*i].adapter == adapter);
            queue.extend(rest);
            mine.into_iter().map(|i| (i, None)).collect::<Vec<_>>()
        };
        if engine_busy {
            // Late arrivals join the current turn only while nobody else waits.
            if queue.iter().all(|i| jobs[*i].adapter == current) {
                return Ok(Admitted {
                    jobs: take(queue, current),
                    extra_s: 0.0,
                });
            }
            return Ok(Admitted::default());
        }
        let Some(&oldest) = queue.front() else {
            return Ok(Admitted::default());
        };
        let next = jobs[oldest].adapter;
        let mut extra = 0.0;
        if next != current || self.swaps == 0 {
            if let Some(a) = next {
                extra = self.swap_to(a)?;
            }
            self.current = next;
        }
        Ok(Admitted {
            jobs: take(queue, next),
            extra_s: extra,
        })
    }
}
