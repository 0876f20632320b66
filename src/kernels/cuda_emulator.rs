//! Our CUDA kernels (`choices.cu`, `paged_attention.cu`, `fused_epilogue.cu`) run on the CPU
//! (the `cuda-emulator` feature, which the tests turn on), so that a machine without a GPU (CI's)
//! runs the CUDA C the GPU will run and holds it to the CPU kernels. `cuda_emulator.hpp` gives
//! CUDA's execution model (a block's threads as fibers, barriers and warp shuffles, an error
//! where a barrier cannot open); this file compiles it with the `.cu` sources by the system's C++
//! compiler (`$CXX`, else `c++`) once per process, loads the library, and launches kernels on
//! operands placed between inaccessible pages, so a read or write past an operand stops the
//! process rather than passing unseen.
//!
//! On a thread that is [`emulating`] (or marked by [`emulate_this_thread`]: an engine's compute
//! pool, `EngineConfig::emulate_cuda`), the ops of `greedy.rs`, `sample.rs`, `logprob.rs`,
//! `sled.rs`, `paged_attention.rs` and `fused_epilogue.rs` run their CUDA kernels here in place
//! of their CPU code, launched as their `cuda_fwd` launches them: the choice ops through
//! [`super::cuda_source::ChoiceKernel`], the others through the launch shapes they share with
//! their CUDA launch. Then the start-up checks (`check`), which hold a device's kernels to the
//! CPU's functions, hold these, and a server's batched path runs the GPU's kernels end to end.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CString};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{CpuStorage, DType, Layout, Result, Shape};

use super::cuda_source::{ChoiceKernel, CHOICE_THREADS};

/// The sources, each with the name its functions are kept apart under.
const SOURCES: [(&str, &str); 3] = [
    ("choices", include_str!("choices.cu")),
    ("paged_attention", include_str!("paged_attention.cu")),
    ("fused_epilogue", include_str!("fused_epilogue.cu")),
];
const RUNTIME: &str = include_str!("cuda_emulator.hpp");

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const u32,
    *const u32,
    u32,
    *const c_char,
    *mut *mut c_void,
    i32,
    *mut c_char,
    usize,
) -> i32;

/// The compiled library, loaded (or why not), and the lock that keeps launches one at a time:
/// the emulator's state (and `__shared__` arrays) is the process's.
fn library() -> Result<&'static Mutex<libloading::Library>> {
    static LIB: OnceLock<std::result::Result<Mutex<libloading::Library>, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map(Mutex::new))
        .as_ref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn build() -> std::result::Result<libloading::Library, String> {
    let dir = std::env::temp_dir().join(format!("exitserve-cuda-emulator-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    write("cuda_emulator.hpp", RUNTIME)?;
    let mut files = vec![write(
        "launch.cpp",
        "#define EMU_LAUNCH_ENTRY\n#include \"cuda_emulator.hpp\"\n",
    )?];
    for (name, source) in SOURCES {
        files.push(write(&format!("{name}.cpp"), &unit(name, source))?);
    }
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = dir.join("libcuda_emulator.so");
    let status = Command::new(&compiler)
        .args(["-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-o"])
        .arg(&out)
        .args(&files)
        .output()
        .map_err(|e| format!("the CUDA emulator needs a C++ compiler ({compiler}): {e}"))?;
    if !status.status.success() {
        return Err(format!(
            "{compiler} could not compile the kernels for the CUDA emulator:\n{}",
            String::from_utf8_lossy(&status.stderr)
        ));
    }
    // SAFETY: our own library, whose initialisers only fill the kernel registry.
    let lib = unsafe { libloading::Library::new(&out) }.map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(lib)
}

/// `source` as C++: inside its own namespace (the files share helper names), each `extern
/// __shared__` array the launch's dynamic shared memory, each kernel registered by name.
fn unit(name: &str, source: &str) -> String {
    let mut text =
        format!("#include \"cuda_emulator.hpp\"\nnamespace {name} {{\n#line 1 \"{name}.cu\"\n");
    for line in source.lines() {
        match line.trim().strip_prefix("extern __shared__ ") {
            Some(decl) => {
                // `T name[];`
                let (ty, var) = decl
                    .trim_end_matches("[];")
                    .rsplit_once(' ')
                    .unwrap_or(("", ""));
                text += &format!(
                    "{ty}* {var} = reinterpret_cast<{ty}*>(::emu::dynamic_shared_memory.data());\n"
                );
            }
            None => text += &format!("{line}\n"),
        }
    }
    text += "}\n";
    for (i, kernel) in kernels(source).iter().enumerate() {
        text += &format!(
            "static ::emu::Register r{i}(\"{kernel}\", &{name}::{kernel}, \
             &::emu::bound<&{name}::{kernel}>);\n"
        );
    }
    text
}

/// The names of `source`'s kernels (`extern "C" __global__ void [__launch_bounds__(..)] name(`).
fn kernels(source: &str) -> Vec<String> {
    source
        .split("extern \"C\" __global__ void")
        .skip(1)
        .map(|rest| {
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix("__launch_bounds__(") {
                Some(r) => &r[r.find(')').map_or(0, |i| i + 1)..],
                None => rest,
            };
            rest.trim_start()
                .split('(')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .collect()
}

/// A buffer a kernel reads or writes.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Operand {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U32(Vec<u32>),
    /// bfloat16 or float16, as its bits
    U16(Vec<u16>),
}

impl Operand {
    fn bytes(&self) -> (&[u8], usize, char) {
        fn raw<T>(v: &[T]) -> &[u8] {
            // SAFETY: plain numbers, read as their bytes.
            unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
        }
        match self {
            Operand::F32(v) => (raw(v), 4, 'F'),
            Operand::F64(v) => (raw(v), 8, 'D'),
            Operand::U32(v) => (raw(v), 4, 'U'),
            Operand::U16(v) => (raw(v), 2, 'H'),
        }
    }

    fn set_bytes(&mut self, from: &[u8]) {
        fn raw<T>(v: &mut [T]) -> &mut [u8] {
            // SAFETY: plain numbers, any bytes of which are one.
            unsafe {
                std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), std::mem::size_of_val(v))
            }
        }
        match self {
            Operand::F32(v) => raw(v).copy_from_slice(from),
            Operand::F64(v) => raw(v).copy_from_slice(from),
            Operand::U32(v) => raw(v).copy_from_slice(from),
            Operand::U16(v) => raw(v).copy_from_slice(from),
        }
    }

    /// The elements a view of a CPU storage holds contiguously.
    pub(super) fn of(s: &CpuStorage, l: &Layout) -> Result<Operand> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("CUDA emulator: contiguous operands");
        };
        Self::elements(s, a, b)
    }

    /// A storage's elements from `from` on (a view whose rows lie apart, read in place).
    pub(super) fn from_start(s: &CpuStorage, from: usize) -> Result<Operand> {
        let end = match s {
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::U32(v) => v.len(),
            _ => 0,
        };
        Self::elements(s, from, end)
    }

    /// Elements `a..b` of `s`: float32, float64 or u32, or a 16-bit float's bits (which the
    /// kernels read).
    fn elements(s: &CpuStorage, a: usize, b: usize) -> Result<Operand> {
        Ok(match s {
            CpuStorage::F32(v) => Operand::F32(v[a..b].to_vec()),
            CpuStorage::F64(v) => Operand::F64(v[a..b].to_vec()),
            CpuStorage::U32(v) => Operand::U32(v[a..b].to_vec()),
            CpuStorage::BF16(v) => Operand::U16(v[a..b].iter().map(|x| x.to_bits()).collect()),
            CpuStorage::F16(v) => Operand::U16(v[a..b].iter().map(|x| x.to_bits()).collect()),
            _ => candle_core::bail!("CUDA emulator: a float32, float64, u32 or 16-bit operand"),
        })
    }

    /// A zeroed (or otherwise `filled`) operand of `n` elements of `dtype` (16-bit floats as
    /// their bits).
    pub(super) fn filled(dtype: DType, n: usize, float: f64, id: u32) -> Result<Operand> {
        Ok(match dtype {
            DType::F32 => Operand::F32(vec![float as f32; n]),
            DType::F64 => Operand::F64(vec![float; n]),
            DType::U32 => Operand::U32(vec![id; n]),
            DType::BF16 => Operand::U16(vec![half::bf16::from_f64(float).to_bits(); n]),
            DType::F16 => Operand::U16(vec![half::f16::from_f64(float).to_bits(); n]),
            d => candle_core::bail!("CUDA emulator: a {d:?} operand"),
        })
    }

    /// The operand as a storage of `dtype` (which names what its 16 bits are).
    pub(super) fn into_storage(self, dtype: DType) -> Result<CpuStorage> {
        Ok(match (self, dtype) {
            (Operand::F32(v), DType::F32) => CpuStorage::F32(v),
            (Operand::F64(v), DType::F64) => CpuStorage::F64(v),
            (Operand::U32(v), DType::U32) => CpuStorage::U32(v),
            (Operand::U16(v), DType::BF16) => {
                CpuStorage::BF16(v.into_iter().map(half::bf16::from_bits).collect())
            }
            (Operand::U16(v), DType::F16) => {
                CpuStorage::F16(v.into_iter().map(half::f16::from_bits).collect())
            }
            (_, d) => candle_core::bail!("CUDA emulator: an operand read as {d:?}"),
        })
    }
}

/// One argument of a launch.
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    /// Operand `.0` from its element `.1`, as the pointer its dtype names.
    At(usize, usize),
    /// Operand `.0` from its element `.1`, as a `void*`.
    Void(usize, usize),
    /// A null `void*`.
    NullVoid,
    /// A null `const float*`.
    NullF32,
    I32(i32),
    U32(u32),
    F32(f32),
}

/// A launch's shape: blocks, threads per block, bytes of dynamic shared memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    pub blocks: [u32; 3],
    pub threads: [u32; 3],
    pub shared_bytes: u32,
}

/// A page-aligned mapping whose operand bytes end where an inaccessible page begins, after an
/// inaccessible page of its own.
struct Guarded {
    base: *mut u8,
    len: usize,
    data: *mut u8,
}

impl Guarded {
    fn new(bytes: &[u8]) -> Guarded {
        // SAFETY: sysconf reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let body = bytes.len().div_ceil(page).max(1) * page;
        let len = body + 2 * page;
        // SAFETY: a fresh private anonymous mapping, its guard pages then made inaccessible;
        // `data` lies within it, `bytes.len()` bytes before the last page.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(base, libc::MAP_FAILED, "CUDA emulator: mmap");
            let base = base.cast::<u8>();
            libc::mprotect(base.cast(), page, libc::PROT_NONE);
            libc::mprotect(base.add(page + body).cast(), page, libc::PROT_NONE);
            let data = base.add(page + body - bytes.len());
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, bytes.len());
            Guarded { base, len, data }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made, no longer used.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Runs `kernel` over `grid` with `args`, which name `operands`; what the kernel wrote is in
/// `operands` after. An error names a kernel that does not exist, arguments that do not match
/// its parameters, or a barrier that could not open; inside [`emulating`] (the tests of the
/// kernels), also a race: it runs a block's threads first to last, then last to first
/// between barriers, and results that differ show a value read and written by different
/// threads with no barrier between (which a GPU's scheduling may order either way).
pub(super) fn launch(
    kernel: &str,
    grid: Grid,
    operands: &mut [Operand],
    args: &[Arg],
) -> Result<()> {
    if !RACE_CHECK.with(|r| r.get()) {
        return launch_in_order(kernel, grid, operands, args, false);
    }
    let mut forward = operands.to_vec();
    launch_in_order(kernel, grid, &mut forward, args, false)?;
    launch_in_order(kernel, grid, operands, args, true)?;
    let same = |a: &Operand, b: &Operand| a.bytes().0 == b.bytes().0;
    if let Some(i) = (0..operands.len()).find(|&i| !same(&operands[i], &forward[i])) {
        candle_core::bail!(
            "emulated {kernel}: operand {i} depends on the order its threads run (a race: a \
             value read and written by different threads with no barrier between)"
        );
    }
    Ok(())
}

fn launch_in_order(
    kernel: &str,
    grid: Grid,
    operands: &mut [Operand],
    args: &[Arg],
    reversed: bool,
) -> Result<()> {
    let lib = library()?.lock().unwrap_or_else(|p| p.into_inner());
    let guarded: Vec<(Guarded, usize)> = operands
        .iter()
        .map(|o| {
            let (bytes, size, _) = o.bytes();
            (Guarded::new(bytes), size)
        })
        .collect();
    let mut signature = String::new();
    // Every argument's value in 8 bytes; `pointers` point at them, as cuLaunchKernel reads.
    let mut values: Vec<u64> = Vec::with_capacity(args.len());
    for a in args {
        let (code, value) = match *a {
            Arg::At(i, at) | Arg::Void(i, at) => {
                let (g, size) = &guarded[i];
                let code = match a {
                    Arg::Void(..) => 'V',
                    _ => operands[i].bytes().2,
                };
                // SAFETY: a pointer into the operand's mapping (`at` is checked by the kernel's
                // own reads, which the guard pages fence).
                (code, unsafe { g.data.add(at * size) } as u64)
            }
            Arg::NullVoid => ('V', 0),
            Arg::NullF32 => ('F', 0),
            Arg::I32(v) => ('i', v as u32 as u64),
            Arg::U32(v) => ('u', v as u64),
            Arg::F32(v) => ('f', v.to_bits() as u64),
        };
        signature.push(code);
        values.push(value);
    }
    let mut pointers: Vec<*mut c_void> = values
        .iter_mut()
        .map(|v| (v as *mut u64).cast::<c_void>())
        .collect();
    let name = CString::new(kernel).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let signature = CString::new(signature).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut why = vec![0 as c_char; 512];
    // SAFETY: the library's entry, given what it reads: NUL-terminated names, three u32s each,
    // pointers to each argument's value (little-endian: an i32, u32 or f32 in the low bytes of
    // its u64), whose types it checks against the kernel's before it runs, and a buffer for
    // its reason of `why.len()` bytes.
    let failed = unsafe {
        let launch: libloading::Symbol<LaunchFn> = lib
            .get(b"emu_launch")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        launch(
            name.as_ptr(),
            grid.blocks.as_ptr(),
            grid.threads.as_ptr(),
            grid.shared_bytes,
            signature.as_ptr(),
            pointers.as_mut_ptr(),
            reversed as i32,
            why.as_mut_ptr(),
            why.len(),
        )
    };
    LAUNCHED.with(|l| l.borrow_mut().push(kernel.to_string()));
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
    for (o, (g, _)) in operands.iter_mut().zip(&guarded) {
        let n = o.bytes().0.len();
        // SAFETY: the `n` bytes `Guarded::new` copied in, which the kernel may have written.
        o.set_bytes(unsafe { std::slice::from_raw_parts(g.data, n) });
    }
    if failed != 0 {
        // SAFETY: the entry wrote a NUL-terminated reason into `why`.
        let why = unsafe { std::ffi::CStr::from_ptr(why.as_ptr()) };
        candle_core::bail!("emulated {kernel}: {}", why.to_string_lossy());
    }
    Ok(())
}

thread_local! {
    static EMULATING: Cell<bool> = const { Cell::new(false) };
    /// Whether launches run twice, in both orders of a block's threads ([`launch`]).
    static RACE_CHECK: Cell<bool> = const { Cell::new(false) };
    /// The kernels launched here on this thread, so that a test sees they ran ([`launched`]).
    static LAUNCHED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Launches made here by the whole process.
static LAUNCHES: AtomicUsize = AtomicUsize::new(0);

/// How many kernels the process has launched here: what a test of a server sees ran.
pub fn launches() -> usize {
    LAUNCHES.load(Ordering::Relaxed)
}

/// This thread's ops run their CUDA kernels here from now on (a compute pool's threads, as they
/// start).
pub fn emulate_this_thread() {
    EMULATING.with(|e| e.set(true));
}

/// `f` with this thread's ops running their CUDA kernels here (see the header), each launch
/// checked for races.
pub fn emulating<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool, bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            EMULATING.with(|e| e.set(self.0));
            RACE_CHECK.with(|r| r.set(self.1));
        }
    }
    let _reset = Reset(
        EMULATING.with(|e| e.replace(true)),
        RACE_CHECK.with(|r| r.replace(true)),
    );
    f()
}

/// Whether this thread is [`emulating`].
pub(super) fn active() -> bool {
    EMULATING.with(|e| e.get())
}

/// The kernels this thread launched here since the last call, by name: what a test sees ran.
pub fn launched() -> BTreeSet<String> {
    LAUNCHED.with(|l| l.borrow_mut().drain(..).collect())
}

/// What `op`'s kernel makes of `inputs` (in the op's order), launched as
/// `cuda_source::launch_op` launches it; None unless this thread is [`emulating`] (the seam
/// each choice op's `cpu_fwd` opens in tests).
pub(super) fn instead(
    op: &impl ChoiceKernel,
    inputs: &[(&CpuStorage, &Layout)],
) -> Result<Option<(CpuStorage, Shape)>> {
    if !active() {
        return Ok(None);
    }
    let (rows, vocab) = inputs[0].1.shape().dims2()?;
    let (dtype, width) = op.output();
    let n = rows * width.unwrap_or(1);
    let shape = op.shape(rows);
    if rows == 0 || vocab == 0 {
        // as `launch_op`: zeros, no launch
        let zeros = Operand::filled(dtype, n, 0.0, 0)?;
        return Ok(Some((zeros.into_storage(dtype)?, shape)));
    }
    let mut operands = inputs
        .iter()
        .map(|&(s, l)| Operand::of(s, l))
        .collect::<Result<Vec<_>>>()?;
    // What the kernel leaves unwritten shows: NaN, or an id no vocabulary has.
    operands.push(Operand::filled(dtype, n, f64::NAN, u32::MAX - 1)?);
    let mut args: Vec<Arg> = (0..operands.len()).map(|i| Arg::At(i, 0)).collect();
    args.push(Arg::U32(vocab as u32));
    if let Some(w) = width {
        args.push(Arg::U32(w as u32));
    }
    let grid = Grid {
        blocks: [rows as u32, 1, 1],
        threads: [CHOICE_THREADS, 1, 1],
        shared_bytes: 0,
    };
    launch(op.kernel(), grid, &mut operands, &args)?;
    let out = operands.pop().expect("the output operand");
    Ok(Some((out.into_storage(dtype)?, shape)))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::kernels::greedy::ContrastRule;
    use crate::kernels::{greedy, logprob, sample, sled};

    /// A start-up check: its name, tolerance, run, and the kernels it launches.
    type Check<'a> = (&'a str, f32, &'a dyn Fn() -> Result<f32>, &'a [&'a str]);

    #[test]
    fn every_choice_kernel_passes_the_start_up_check_a_gpu_must_pass() -> Result<()> {
        // the tolerances of `multi_exit`'s start-up checks, at the released models' vocabulary
        // and at ones of under one, two and a few passes, not multiples of a block's threads
        // (a small vocabulary puts the check's -inf logits inside its contrasts' sets)
        for vocab in [16, 300, 4099, 50257] {
            let cpu = Device::Cpu;
            let checks: [Check<'_>; 4] = [
                (
                    "greedy",
                    1e-5,
                    &|| greedy::check(&cpu, vocab),
                    &[
                        "argmax_rows",
                        "contrast_rows",
                        "divergence_rows",
                        "margin_rows",
                    ],
                ),
                (
                    "logprob",
                    1e-5,
                    &|| logprob::check(&cpu, vocab),
                    &["contrast_logprob_rows", "logprob_rows"],
                ),
                (
                    "sample",
                    1e-5,
                    &|| sample::check(&cpu, vocab),
                    &["contrast_sample_rows", "sample_rows"],
                ),
                ("sled", 1e-4, &|| sled::check(&cpu, vocab), &["sled_rows"]),
            ];
            for (name, tolerance, check, kernels) in checks {
                launched();
                let difference = emulating(check)?;
                assert!(
                    difference <= tolerance,
                    "{name}'s kernels, vocabulary {vocab}: {difference} from the CPU's"
                );
                let ran = launched();
                assert_eq!(
                    ran,
                    kernels.iter().map(|k| k.to_string()).collect(),
                    "{name}'s check ran these"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_fused_epilogues_pass_the_start_up_check_a_gpu_must_pass() -> Result<()> {
        use crate::kernels::fused_epilogue::{check, Activation};
        // the tolerances of `multi_exit`'s start-up check; GPT-Neo-125M's widths, and odd ones
        for (hidden, inner) in [(768, 3072), (37, 300)] {
            for act in [
                Activation::GeluTanh,
                Activation::GeluErf,
                Activation::Relu,
                Activation::Silu,
            ] {
                // products in float32 read in float32, bfloat16 and float16 (candle's
                // matmul), or wide products read in bfloat16
                for (dtypes, tolerance) in [
                    ((DType::F32, DType::F32), 1e-5),
                    ((DType::BF16, DType::BF16), 1e-2),
                    ((DType::F16, DType::F16), 1e-2),
                    ((DType::F32, DType::BF16), 1e-2),
                ] {
                    launched();
                    let difference = emulating(|| check(&Device::Cpu, hidden, inner, act, dtypes))?;
                    assert!(
                        difference <= tolerance,
                        "{hidden}x{inner} {act:?} {dtypes:?}: {difference} from candle's ops"
                    );
                    let want: BTreeSet<String> = ["fused_add_norm", "fused_epilogue"]
                        .map(String::from)
                        .into();
                    assert_eq!(launched(), want);
                }
            }
        }
        Ok(())
    }

    /// Rows whose answers hang on ties, NaNs and infinities, at vocabularies smaller than a
    /// block, not a multiple of it, and several passes of it.
    fn edge_rows(vocab: usize) -> Vec<Vec<f32>> {
        let mut rand = crate::kernels::uniform(vocab as u64 + 17);
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let mut rows = vec![
            // the maximum twice, far apart (other threads, other warps): the first wins
            (0..vocab)
                .map(|i| if i == 1 || i + 1 == vocab { 2.0 } else { 0.0 })
                .collect(),
            (0..vocab)
                .map(|i| if i % 3 == 0 { nan } else { rand() })
                .collect(),
            vec![nan; vocab],
            (0..vocab)
                .map(|i| if i == vocab / 2 { 1.0 } else { -inf })
                .collect(),
            // a grid of eighths: ties everywhere
            (0..vocab).map(|_| (rand() * 24.0).round() / 8.0).collect(),
            vec![0.5; vocab],
        ];
        rows.push(rows[4].iter().rev().copied().collect());
        rows
    }

    #[test]
    fn the_choice_kernels_break_ties_and_meet_nans_as_the_cpu_does() -> Result<()> {
        for vocab in [1, 5, 256, 300, 1027] {
            let rows = edge_rows(vocab);
            let n = rows.len();
            let t = candle_core::Tensor::new(rows.concat(), &Device::Cpu)?.reshape((n, vocab))?;
            let both = |f: &dyn Fn() -> Result<candle_core::Tensor>| -> Result<_> {
                Ok((f()?, emulating(f)?))
            };
            let (cpu, emu) = both(&|| greedy::argmax_rows(&t))?;
            assert_eq!(
                emu.to_vec1::<u32>()?,
                cpu.to_vec1::<u32>()?,
                "argmax, vocab {vocab}"
            );
            // NaN logits: every normaliser skips them (a NaN's own value stays NaN)
            let close = |x: f32, y: f32, tol: f32| {
                (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= tol
            };
            let (cpu, emu) = both(&|| greedy::margin_rows(&t))?;
            for (e, c) in emu.to_vec1::<f32>()?.into_iter().zip(cpu.to_vec1::<f32>()?) {
                assert!(close(e, c, 1e-6), "margin, vocab {vocab}: {e} vs {c}");
            }
            // a log-softmax read: the top's ids follow the logits' order (ties to the lower
            // id); targets in and out of the row
            let targets: Vec<u32> = (0..n as u32)
                .map(|r| (r * 7) % (vocab as u32 + 2))
                .collect();
            let targets = candle_core::Tensor::new(targets.as_slice(), &Device::Cpu)?;
            let top = 8;
            let same_reads =
                |label: &str, cpu: candle_core::Tensor, emu: candle_core::Tensor| -> Result<()> {
                    let (cpu, emu) = (cpu.to_vec2::<f32>()?, emu.to_vec2::<f32>()?);
                    for (r, (e, c)) in emu.iter().zip(&cpu).enumerate() {
                        assert_eq!(
                            e[1 + top..],
                            c[1 + top..],
                            "{label} top ids, vocab {vocab}, row {r}: {e:?} vs {c:?}"
                        );
                        for (&x, &y) in e[..1 + top].iter().zip(&c[..1 + top]) {
                            assert!(
                                close(x, y, 1e-5),
                                "{label}, vocab {vocab}, row {r}: {e:?} vs {c:?}"
                            );
                        }
                    }
                    Ok(())
                };
            let (cpu, emu) = both(&|| logprob::logprob_rows(&t, &targets, top))?;
            same_reads("logprobs", cpu, emu)?;
            // contrasts of each row over the next (a lower head with NaN, -inf, ties),
            // autocontrast's with its floors and every token plausible, and DoLa's
            let lower = t.roll(-1, 0)?;
            let rules = [
                ContrastRule::Autocontrast {
                    ln_alpha: 0.1f32.ln(),
                    minimum_candidates: 1,
                },
                ContrastRule::Autocontrast {
                    ln_alpha: 0.5f32.ln(),
                    minimum_candidates: 3,
                },
                ContrastRule::Autocontrast {
                    ln_alpha: f32::NEG_INFINITY,
                    minimum_candidates: 1,
                },
                ContrastRule::Dola {
                    ln_relative_top: 0.1f32.ln(),
                },
            ];
            for rule in rules {
                let rules = greedy::contrast_rules(&vec![rule; n], &Device::Cpu)?;
                let (cpu, emu) = both(&|| greedy::contrast_rows(&t, &lower, &rules))?;
                assert_eq!(
                    emu.to_vec1::<u32>()?,
                    cpu.to_vec1::<u32>()?,
                    "{rule:?}, vocab {vocab}"
                );
                let params = logprob::contrast_params(&vec![rule; n], &targets)?;
                let (cpu, emu) =
                    both(&|| logprob::contrast_logprob_rows(&t, &lower, &params, top))?;
                same_reads(&format!("{rule:?}"), cpu, emu)?;
            }
            let (cpu, emu) = both(&|| greedy::divergence_rows(&t, &lower))?;
            for (e, c) in emu.to_vec1::<f64>()?.into_iter().zip(cpu.to_vec1::<f64>()?) {
                assert!(
                    (e.is_nan() && c.is_nan()) || e == c || (e - c).abs() <= 1e-6,
                    "divergence, vocab {vocab}: {e} vs {c}"
                );
            }
        }
        Ok(())
    }
}
