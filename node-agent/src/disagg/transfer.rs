//! The KV-transfer wire format, as pure functions: a prefill agent cuts each layer's KV pages
//! into chunks below the gRPC message limit, each carrying its byte length and a CRC-32; a
//! decode agent reassembles them, checking every chunk against the layout it declared, and
//! refuses anything corrupted, truncated, duplicated or out of place. A stream may leave out
//! the prompt's first blocks, which the decode agent holds already (its own prefix cache):
//! chunks then start at that block, and the reassembled KV covers only the rest.

use loraplane_proto::v1::{Dtype, KvChunk, KvLayout, PrefillDone};

use crate::engine::request::{KvImport, KvLayer};

/// Why a KV stream was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransferError {
    #[error("KV layout mismatch: {0}")]
    Layout(String),
    #[error("corrupt KV chunk (layer {layer}, block {block}): {reason}")]
    Corrupt {
        layer: u32,
        block: u32,
        reason: String,
    },
    #[error("truncated KV stream: {0}")]
    Truncated(String),
    #[error("a page of {page_bytes} bytes does not fit the {max} byte chunk limit")]
    ChunkLimit { page_bytes: usize, max: usize },
}

impl TransferError {
    pub fn kind(&self) -> &'static str {
        match self {
            TransferError::Layout(_) => "layout",
            TransferError::Corrupt { .. } => "corrupt",
            TransferError::Truncated(_) => "truncated",
            TransferError::ChunkLimit { .. } => "chunk_limit",
        }
    }
}

/// The geometry both sides must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireLayout {
    pub num_layers: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl WireLayout {
    /// f32 values of one block of one layer as it travels: the block's keys, then its values.
    /// Not the pool's page size (`KvGeometry::page_elems`), which can be larger, since a pool
    /// page must also hold an adapter row; only the KV part of a page is sent.
    pub fn block_elems(&self) -> usize {
        2 * self.block_size * self.num_kv_heads * self.head_dim
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The proto message describing this layout for a prompt of `tokens` tokens.
    pub fn to_proto(&self, tokens: usize) -> KvLayout {
        KvLayout {
            num_layers: self.num_layers as u32,
            block_size: self.block_size as u32,
            num_kv_heads: self.num_kv_heads as u32,
            head_dim: self.head_dim as u32,
            dtype: Dtype::F32 as i32,
            num_blocks: self.blocks_for(tokens) as u32,
        }
    }

    /// Checks that a peer's declared layout is exactly ours.
    pub fn check(&self, theirs: &KvLayout, tokens: usize) -> Result<(), TransferError> {
        let ours = self.to_proto(tokens);
        if *theirs != ours {
            return Err(TransferError::Layout(format!(
                "peer declared {theirs:?}, this agent has {ours:?}"
            )));
        }
        Ok(())
    }
}

/// Splits one layer into chunks of whole pages, each at most `max_chunk_bytes` of data,
/// leaving out its first `skip` blocks (the receiver holds them).
pub fn encode_layer(
    layout: &WireLayout,
    layer: &KvLayer,
    max_chunk_bytes: usize,
    skip: usize,
) -> Result<Vec<KvChunk>, TransferError> {
    let block_elems = layout.block_elems();
    let page_bytes = block_elems * 4;
    if page_bytes > max_chunk_bytes {
        return Err(TransferError::ChunkLimit {
            page_bytes,
            max: max_chunk_bytes,
        });
    }
    let pages_per_chunk = max_chunk_bytes / page_bytes;
    if !layer.data.len().is_multiple_of(block_elems) {
        return Err(TransferError::Layout(format!(
            "layer {} has {} values, not a whole number of {block_elems}-value pages",
            layer.layer,
            layer.data.len()
        )));
    }
    let Some(sent) = layer.data.get(skip * block_elems..) else {
        return Err(TransferError::Layout(format!(
            "{skip} blocks to skip, layer {} has {}",
            layer.layer,
            layer.data.len() / block_elems
        )));
    };
    Ok(sent
        .chunks(pages_per_chunk * block_elems)
        .enumerate()
        .map(|(i, values)| {
            // Fixed-size 4-byte copies compile to a straight memcpy-speed loop; the former
            // `flat_map` collect grew the vector byte by byte.
            let mut data = vec![0u8; values.len() * 4];
            for (d, v) in data.chunks_exact_mut(4).zip(values) {
                d.copy_from_slice(&v.to_le_bytes());
            }
            KvChunk {
                layer: layer.layer as u32,
                first_block: (skip + i * pages_per_chunk) as u32,
                num_blocks: (values.len() / block_elems) as u32,
                num_tokens: layer.num_tokens as u32,
                dtype: Dtype::F32 as i32,
                byte_length: data.len() as u64,
                checksum: crc32fast::hash(&data),
                data,
            }
        })
        .collect())
}

/// Reassembles a KV stream on the decode side.
#[derive(Debug)]
pub struct Assembler {
    layout: WireLayout,
    tokens: usize,
    blocks: usize,
    /// The prompt's first blocks, which the stream leaves out (the decode agent holds them).
    skip: usize,
    /// Blocks `skip..blocks` of each layer.
    layers: Vec<Vec<f32>>,
    /// `received[layer][block - skip]`.
    received: Vec<Vec<bool>>,
    chunks: u32,
    pub bytes: u64,
}

impl Assembler {
    /// A stream of a `tokens`-token prompt's KV that leaves out its first `skip` blocks
    /// (fewer than the prompt has).
    pub fn new(layout: WireLayout, tokens: usize, skip: usize) -> Self {
        let blocks = layout.blocks_for(tokens);
        let skip = skip.min(blocks.saturating_sub(1));
        let sent = blocks - skip;
        Assembler {
            layout,
            tokens,
            blocks,
            skip,
            layers: vec![vec![0.0; sent * layout.block_elems()]; layout.num_layers],
            received: vec![vec![false; sent]; layout.num_layers],
            chunks: 0,
            bytes: 0,
        }
    }

    /// Validates and stores one chunk.
    pub fn push(&mut self, chunk: &KvChunk) -> Result<(), TransferError> {
        let corrupt = |reason: String| TransferError::Corrupt {
            layer: chunk.layer,
            block: chunk.first_block,
            reason,
        };
        let (layer, first, n) = (
            chunk.layer as usize,
            chunk.first_block as usize,
            chunk.num_blocks as usize,
        );
        if layer >= self.layout.num_layers {
            return Err(corrupt(format!(
                "layer beyond the model's {}",
                self.layout.num_layers
            )));
        }
        if n == 0 || first.checked_add(n).is_none_or(|end| end > self.blocks) {
            return Err(corrupt(format!(
                "blocks {first}+{n} outside the prompt's {}",
                self.blocks
            )));
        }
        if first < self.skip {
            return Err(corrupt(format!(
                "blocks {first}+{n} start before block {}, the first one asked for",
                self.skip
            )));
        }
        // Index within what is sent.
        let first = first - self.skip;
        if chunk.dtype != Dtype::F32 as i32 {
            return Err(corrupt(format!(
                "dtype {} is not the declared f32",
                chunk.dtype
            )));
        }
        if chunk.num_tokens as usize != self.tokens {
            return Err(corrupt(format!(
                "{} tokens declared, the prompt has {}",
                chunk.num_tokens, self.tokens
            )));
        }
        let expected = n * self.layout.block_elems() * 4;
        if chunk.byte_length != chunk.data.len() as u64 || chunk.data.len() != expected {
            return Err(corrupt(format!(
                "{} bytes (declared {}), the layout needs {expected}",
                chunk.data.len(),
                chunk.byte_length
            )));
        }
        if crc32fast::hash(&chunk.data) != chunk.checksum {
            return Err(corrupt("checksum mismatch".to_owned()));
        }
        if self.received[layer][first..first + n].iter().any(|r| *r) {
            return Err(corrupt("blocks received twice".to_owned()));
        }
        let page = self.layout.block_elems();
        let dst = &mut self.layers[layer][first * page..(first + n) * page];
        for (d, b) in dst.iter_mut().zip(chunk.data.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        self.received[layer][first..first + n]
            .iter_mut()
            .for_each(|r| *r = true);
        self.chunks += 1;
        self.bytes += chunk.data.len() as u64;
        Ok(())
    }

    /// Layers complete so far (for progress and tests).
    pub fn complete_layers(&self) -> usize {
        self.received
            .iter()
            .filter(|l| l.iter().all(|r| *r))
            .count()
    }

    /// Ends the stream: every page of every layer must have arrived, exactly as `done` counts.
    pub fn finish(self, done: &PrefillDone, vocab: usize) -> Result<KvImport, TransferError> {
        if done.chunks != self.chunks {
            return Err(TransferError::Truncated(format!(
                "{} chunks announced, {} received",
                done.chunks, self.chunks
            )));
        }
        if let Some(l) = self.received.iter().position(|l| !l.iter().all(|r| *r)) {
            return Err(TransferError::Truncated(format!("layer {l} is incomplete")));
        }
        if done.prompt_tokens as usize != self.tokens {
            return Err(TransferError::Layout(format!(
                "{} prompt tokens computed, {} sent",
                done.prompt_tokens, self.tokens
            )));
        }
        if done.first_token as usize >= vocab {
            return Err(TransferError::Corrupt {
                layer: 0,
                block: 0,
                reason: "first token outside the vocabulary".into(),
            });
        }
        Ok(KvImport {
            first_block: self.skip,
            layers: self.layers,
            first_token: done.first_token,
            first_logprob: Some(done.first_token_logprob),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> WireLayout {
        WireLayout {
            num_layers: 2,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 3,
        }
    }

    fn layer(l: usize, tokens: usize) -> KvLayer {
        let n = layout().blocks_for(tokens) * layout().block_elems();
        KvLayer {
            layer: l,
            num_tokens: tokens,
            data: (0..n).map(|i| (i * 7 + l) as f32 * 0.5 - 3.0).collect(),
        }
    }

    fn done(chunks: u32, tokens: u32) -> PrefillDone {
        PrefillDone {
            first_token: 5,
            first_token_logprob: -0.5,
            prompt_tokens: tokens,
            prefill_us: 1,
            chunks,
            composed_adapters: 0,
        }
    }

    fn all_chunks(tokens: usize, max: usize) -> Vec<KvChunk> {
        (0..2)
            .flat_map(|l| encode_layer(&layout(), &layer(l, tokens), max, 0).unwrap())
            .collect()
    }

    #[test]
    fn round_trips_in_chunks_below_the_limit() {
        let tokens = 13; // 4 blocks, the last partly filled
        let chunks = all_chunks(tokens, 192 * 3); // three 192-byte pages per chunk
        assert!(chunks.iter().all(|c| c.data.len() <= 192 * 3));
        assert_eq!(chunks.len(), 4);
        let mut a = Assembler::new(layout(), tokens, 0);
        for c in chunks.iter().rev() {
            a.push(c).unwrap(); // any order
        }
        let import = a.finish(&done(4, 13), 100).unwrap();
        assert_eq!(
            import.layers,
            vec![layer(0, tokens).data, layer(1, tokens).data]
        );
        assert_eq!(import.first_token, 5);
    }

    #[test]
    fn refuses_corruption_truncation_and_duplicates() {
        let tokens = 9;
        let chunks = all_chunks(tokens, 192 * 2);
        let mut flipped = chunks[1].clone();
        flipped.data[3] ^= 0x10;
        let mut lying = chunks[0].clone();
        lying.byte_length += 4;
        let mut short = chunks[0].clone();
        short.data.truncate(8);
        short.byte_length = 8;
        short.checksum = crc32fast::hash(&short.data);
        let mut far = chunks[0].clone();
        far.first_block = 7;
        let mut layer9 = chunks[0].clone();
        layer9.layer = 9;
        for (bad, expect) in [
            (flipped, "checksum"),
            (lying, "declared"),
            (short, "the layout needs"),
            (far, "outside"),
            (layer9, "beyond"),
        ] {
            let err = Assembler::new(layout(), tokens, 0).push(&bad).unwrap_err();
            assert_eq!(err.kind(), "corrupt");
            assert!(err.to_string().contains(expect), "{err}");
        }
        let mut a = Assembler::new(layout(), tokens, 0);
        a.push(&chunks[0]).unwrap();
        assert!(
            a.push(&chunks[0])
                .unwrap_err()
                .to_string()
                .contains("twice")
        );

        let mut a = Assembler::new(layout(), tokens, 0);
        for c in &chunks[..chunks.len() - 1] {
            a.push(c).unwrap();
        }
        let n = chunks.len() as u32;
        assert_eq!(a.finish(&done(n, 9), 100).unwrap_err().kind(), "truncated");
    }

    #[test]
    fn a_stream_can_leave_out_the_blocks_the_receiver_holds() {
        let tokens = 13; // 4 blocks
        let page = layout().block_elems();
        let chunks: Vec<KvChunk> = (0..2)
            .flat_map(|l| encode_layer(&layout(), &layer(l, tokens), page * 4, 2).unwrap())
            .collect();
        assert_eq!(
            chunks.len(),
            4,
            "blocks 2 and 3 of two layers, one page each"
        );
        assert!(chunks.iter().all(|c| c.first_block >= 2));
        let mut a = Assembler::new(layout(), tokens, 2);
        for c in &chunks {
            a.push(c).unwrap();
        }
        let import = a.finish(&done(4, 13), 100).unwrap();
        assert_eq!(import.first_block, 2);
        assert_eq!(import.layers[0], layer(0, tokens).data[2 * page..]);
        assert_eq!(import.layers[1], layer(1, tokens).data[2 * page..]);

        // A block the receiver holds is refused, and so is a stream missing one it lacks.
        let full = all_chunks(tokens, page * 4);
        let err = Assembler::new(layout(), tokens, 2)
            .push(&full[0])
            .unwrap_err();
        assert!(err.to_string().contains("first one asked for"), "{err}");
        let mut a = Assembler::new(layout(), tokens, 1);
        for c in &chunks {
            a.push(c).unwrap();
        }
        assert_eq!(a.finish(&done(4, 13), 100).unwrap_err().kind(), "truncated");
        // Leaving out more blocks than the layer has is a layout error.
        assert_eq!(
            encode_layer(&layout(), &layer(0, tokens), page * 4, 5)
                .unwrap_err()
                .kind(),
            "layout"
        );
    }

    #[test]
    fn layouts_must_match_exactly() {
        let ours = layout();
        let theirs = WireLayout {
            block_size: 8,
            ..ours
        };
        assert!(ours.check(&theirs.to_proto(10), 10).is_err());
        assert!(ours.check(&ours.to_proto(10), 10).is_ok());
        assert_eq!(
            encode_layer(&ours, &layer(0, 4), 10, 0).unwrap_err().kind(),
            "chunk_limit"
        );
    }
}
