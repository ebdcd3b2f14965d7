//! What the emulator cannot run, found in the kernel sources before they are compiled, so a
//! kernel that uses it fails the build naming the construct instead of compiling to something
//! that silently computes another thing. `build.rs` runs [`unsupported`] on every `.cu` file
//! and on the prelude as the emulator compiles it; `shim/emu.h` guards what only the compiler
//! or the launch can see (8-byte shuffles, 2-D blocks at launch).
//!
//! Why each construct cannot be emulated by `shim/emu.h`:
//! - inline PTX (`asm`): there is no PTX to run on the CPU (the prelude's two f16 conversions
//!   are replaced by build.rs; nothing else may use it);
//! - a static `__shared__` array: `__shared__` is defined away, so each emulated thread would
//!   get its own copy instead of one per block (dynamic `extern __shared__` buffers are global
//!   arrays in shim/emu.cpp, one per name);
//! - 2-D or 3-D thread blocks: emulated threads are numbered along x only, and the warps and
//!   shuffles are formed from `threadIdx.x`;
//! - shuffles other than `__shfl_xor_sync`, warp votes, `__syncwarp` and atomics: not written.

/// A construct the emulator cannot run: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    pub line: usize,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.what)
    }
}

/// `text` with comments blanked (newlines kept, so line numbers stay right).
fn without_comments(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Byte offsets where `word` occurs as a whole identifier.
fn occurrences(text: &str, word: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find(word) {
        let at = from + pos;
        let end = at + word.len();
        let before = at.checked_sub(1).map(|i| b[i]);
        if !before.is_some_and(is_ident) && !b.get(end).copied().is_some_and(is_ident) {
            found.push(at);
        }
        from = end;
    }
    found
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// The identifier right after `offset` (skipping spaces), e.g. a member after `.`.
fn ident_after(text: &str, offset: usize) -> &str {
    let rest = text[offset..].trim_start();
    let end = rest
        .bytes()
        .position(|c| !is_ident(c))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The constructs of `text` (the source of `file`) the emulator cannot run. `shared_buffers`
/// are the dynamic shared-memory names shim/emu.cpp provides.
pub fn unsupported(file: &str, text: &str, shared_buffers: &[&str]) -> Vec<Finding> {
    let code = without_comments(text);
    let mut found = Vec::new();
    let mut add = |offset: usize, what: String| {
        found.push(Finding {
            file: file.to_owned(),
            line: line_of(&code, offset),
            what,
        });
    };
    for word in ["asm", "__asm__", "__asm"] {
        for at in occurrences(&code, word) {
            add(at, format!("inline PTX (`{word}`) is not emulated"));
        }
    }
    for at in occurrences(&code, "__shared__") {
        // The declaration it belongs to starts after the previous `;`, `{` or `}`.
        let start = code[..at].rfind([';', '{', '}']).map_or(0, |i| i + 1);
        if occurrences(&code[start..at], "extern").is_empty() {
            add(
                at,
                "a static `__shared__` array is not emulated (each emulated thread would get \
                 its own copy); use `extern __shared__` dynamic shared memory"
                    .to_owned(),
            );
            continue;
        }
        let decl_end = code[at..].find(';').map_or(code.len(), |i| at + i);
        let name = code[at..decl_end]
            .trim_end()
            .trim_end_matches("[]")
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        if !shared_buffers.contains(&name) {
            add(
                at,
                format!(
                    "dynamic shared memory `{name}` has no buffer in the emulator (add it to \
                     shim/emu.h and shim/emu.cpp)"
                ),
            );
        }
    }
    for var in ["threadIdx", "blockDim"] {
        for at in occurrences(&code, var) {
            let after = code[at + var.len()..].trim_start();
            if let Some(member) = after.strip_prefix('.').map(|m| ident_after(m, 0))
                && (member == "y" || member == "z")
            {
                add(
                    at,
                    format!("2-D and 3-D thread blocks (`{var}.{member}`) are not emulated"),
                );
            }
        }
    }
    let b = code.as_bytes();
    for (at, _) in code.match_indices("__") {
        if at > 0 && is_ident(b[at - 1]) {
            continue;
        }
        let name = ident_after(&code, at);
        let unsupported_intrinsic = (name.starts_with("__shfl") && name != "__shfl_xor_sync")
            || matches!(
                name,
                "__ballot_sync" | "__any_sync" | "__all_sync" | "__activemask" | "__syncwarp"
            );
        if unsupported_intrinsic {
            add(at, format!("`{name}` is not emulated"));
        }
    }
    for at in occurrences(&code, "atomicAdd")
        .into_iter()
        .chain(occurrences(&code, "atomicMax"))
        .chain(occurrences(&code, "atomicMin"))
        .chain(occurrences(&code, "atomicCAS"))
        .chain(occurrences(&code, "atomicExch"))
    {
        add(
            at,
            format!("atomics (`{}`) are not emulated", ident_after(&code, at)),
        );
    }
    found.sort_by_key(|f| f.line);
    found
}

/// The dynamic shared-memory buffers `shim/emu.h` declares (`extern float tile[], …;`).
pub fn shared_buffers(emu_h: &str) -> Vec<String> {
    emu_h
        .lines()
        .filter_map(|l| l.trim().strip_prefix("extern float "))
        .flat_map(|names| names.trim_end_matches(';').split(','))
        .map(|n| n.trim().trim_end_matches("[]").to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUFFERS: &[&str] = &["tile", "smem"];

    fn whats(src: &str) -> Vec<String> {
        unsupported("k.cu", src, BUFFERS)
            .into_iter()
            .map(|f| f.to_string())
            .collect()
    }

    #[test]
    fn supported_code_passes() {
        let src = r#"
            // asm in a comment, threadIdx.y in a comment, __shared__ float x[4];
            /* __shfl_down_sync( atomicAdd( */
            extern "C" __global__ void k(const float* x, float* y) {
                extern __shared__ float tile[];
                extern __shared__ float smem[];
                const unsigned int t = threadIdx.x + blockIdx.y * blockDim.x;
                float v = __shfl_xor_sync(0xffffffffu, x[t], 1);
                float my_asm_value = v; // `asm` only as part of a name
                __syncthreads();
                y[t] = my_asm_value + tile[0] + smem[0] + gridDim.y;
            }
        "#;
        assert_eq!(whats(src), Vec::<String>::new());
    }

    #[test]
    fn each_construct_is_named_with_its_line() {
        let src = "__global__ void k(float* y) {\n\
                   __shared__ float partial[32];\n\
                   asm(\"mov.u32 %0, %%laneid;\" : \"=r\"(l));\n\
                   y[threadIdx.y] = 0;\n\
                   float w = __shfl_down_sync(0xffffffffu, y[0], 1);\n\
                   atomicAdd(y, 1.0f);\n\
                   extern __shared__ float stage[];\n\
                   const int d = blockDim . z;\n\
                   __syncwarp();\n\
                   }\n";
        let found = whats(src);
        let expect = [
            "k.cu:2: a static `__shared__` array",
            "k.cu:3: inline PTX (`asm`)",
            "k.cu:4: 2-D and 3-D thread blocks (`threadIdx.y`)",
            "k.cu:5: `__shfl_down_sync` is not emulated",
            "k.cu:6: atomics (`atomicAdd`)",
            "k.cu:7: dynamic shared memory `stage` has no buffer",
            "k.cu:8: 2-D and 3-D thread blocks (`blockDim.z`)",
            "k.cu:9: `__syncwarp` is not emulated",
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (got, want) in found.iter().zip(expect) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn buffers_come_from_emu_h() {
        let h = "#define __shared__\nextern float tile[], x_stage[], smem[];\n";
        assert_eq!(shared_buffers(h), ["tile", "x_stage", "smem"]);
    }
}
