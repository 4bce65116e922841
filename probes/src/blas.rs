//! f32 matrix products through the system's OpenBLAS when it is installed.
//!
//! Candle's built-in gemm reaches 90-135 GFLOP/s on this project's shapes on a 2-core AVX-512
//! machine; OpenBLAS's `sgemm` reaches 155-190 GFLOP/s on the same shapes (see
//! `mechwatch bench forward`). The library is loaded at run time, not linked, so the binary
//! builds and runs on a machine without it and falls back to candle's gemm.
//!
//! `MECHWATCH_BLAS` chooses: `auto` (the default: OpenBLAS if `libopenblas.so.0` loads),
//! `openblas` (required: an error if it does not load) or `builtin` (candle's gemm only).
//! OpenBLAS runs with as many threads as rayon (`RAYON_NUM_THREADS`).
//!
//! This is the workspace's one module with `unsafe` code: the foreign calls below. Each call
//! passes pointers into slices whose bounds are checked against the matrix extents first.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_float, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
/// Fewer rows per task than this and the split costs more than it gains.
const MIN_ROWS_PER_TASK: usize = 32;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_float,
    *const c_float,
    c_int,
    *const c_float,
    c_int,
    c_float,
    *mut c_float,
    c_int,
);
type SetThreads = unsafe extern "C" fn(c_int);
type GetConfig = unsafe extern "C" fn() -> *const c_char;

struct OpenBlas {
    sgemm: Sgemm,
    description: String,
    // Keeps the library mapped for as long as the function pointers above are used.
    _lib: libloading::Library,
}

/// The backend chosen for this process, decided on first use.
enum Backend {
    OpenBlas(OpenBlas),
    Builtin,
    /// `MECHWATCH_BLAS` asks for what cannot be had: why.
    Unusable(String),
}

fn backend() -> &'static Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let choice = std::env::var("MECHWATCH_BLAS").unwrap_or_default();
        match choice.as_str() {
            "builtin" => Backend::Builtin,
            "openblas" => load().map_or_else(
                |e| Backend::Unusable(format!("MECHWATCH_BLAS=openblas but {e}")),
                Backend::OpenBlas,
            ),
            "" | "auto" => load().map_or(Backend::Builtin, Backend::OpenBlas),
            other => Backend::Unusable(format!(
                "MECHWATCH_BLAS={other:?} is none of auto, openblas, builtin"
            )),
        }
    })
}

const LIBRARY_NAMES: &[&str] = &["libopenblas.so.0", "libopenblas.so", "libopenblas.dylib"];

fn load() -> Result<OpenBlas, String> {
    let mut errors = Vec::new();
    for name in LIBRARY_NAMES {
        // SAFETY: loading OpenBLAS runs its initialisers, which only set up its thread pool.
        match unsafe { libloading::Library::new(*name) } {
            Ok(lib) => return bind(lib).map_err(|e| format!("{name}: {e}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(format!(
        "OpenBLAS could not be loaded ({})",
        errors.join("; ")
    ))
}

fn bind(lib: libloading::Library) -> Result<OpenBlas, libloading::Error> {
    // SAFETY: the symbol types match OpenBLAS's cblas.h and openblas_config.h declarations.
    let (sgemm, set_threads, config) = unsafe {
        (
            *lib.get::<Sgemm>(b"cblas_sgemm\0")?,
            *lib.get::<SetThreads>(b"openblas_set_num_threads\0")?,
            *lib.get::<GetConfig>(b"openblas_get_config\0")?,
        )
    };
    // SAFETY: plain calls without pointer arguments; the config string is static in OpenBLAS.
    let description = unsafe {
        set_threads(1);
        let c = config();
        if c.is_null() {
            "OpenBLAS".to_string()
        } else {
            CStr::from_ptr(c).to_string_lossy().into_owned()
        }
    };
    Ok(OpenBlas {
        sgemm,
        description: format!(
            "{description}, single-threaded calls split over {} rayon threads",
            rayon::current_num_threads()
        ),
        _lib: lib,
    })
}

static BUILTIN_FORCED: AtomicBool = AtomicBool::new(false);

/// Use candle's gemm from now on (`true`) or the chosen backend again (`false`), so that a
/// benchmark can compare both in one process.
pub fn force_builtin(on: bool) {
    BUILTIN_FORCED.store(on, Ordering::Relaxed);
}

/// Whether products go through OpenBLAS.
pub fn available() -> bool {
    !BUILTIN_FORCED.load(Ordering::Relaxed) && matches!(backend(), Backend::OpenBlas(_))
}

impl OpenBlas {
    /// `out [rows, n] = a [rows, k] · b [k, n]`, with `rows = out.len() / n`.
    fn product(
        &self,
        (a, ta, lda): &(&[f32], c_int, usize),
        (b, tb, ldb): &(&[f32], c_int, usize),
        out: &mut [f32],
        n: usize,
        k: usize,
    ) {
        let m = out.len() / n;
        // The last element each operand is read at, from its first (see `operand`).
        let extent = |trans: c_int, ld: usize, rows: usize, cols: usize| {
            if trans == NO_TRANS {
                (rows - 1) * ld + cols
            } else {
                (cols - 1) * ld + rows
            }
        };
        assert!(extent(*ta, *lda, m, k) <= a.len() && extent(*tb, *ldb, k, n) <= b.len());
        // SAFETY: the assertion above keeps every read inside `a` and `b`; `out` holds exactly
        // m rows of n; `matmul` checked that every dimension fits a c_int.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                *ta,
                *tb,
                m as c_int,
                n as c_int,
                k as c_int,
                1.0,
                a.as_ptr(),
                *lda as c_int,
                b.as_ptr(),
                *ldb as c_int,
                0.0,
                out.as_mut_ptr(),
                n as c_int,
            );
        }
    }
}

/// Which backend f32 products use, for benchmarks and `model info`.
pub fn backend_name() -> String {
    match backend() {
        Backend::OpenBlas(b) => b.description.clone(),
        Backend::Builtin => "candle gemm (built in)".to_string(),
        Backend::Unusable(e) => format!("none: {e}"),
    }
}

/// `a [m, k] · b [k, n]`. Uses OpenBLAS when both operands are f32 on the CPU and each is
/// row-major or a transposed row-major view (such as `w.t()`); candle's matmul otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let blas = match backend() {
        _ if BUILTIN_FORCED.load(Ordering::Relaxed) => return a.matmul(b),
        Backend::OpenBlas(blas) => blas,
        Backend::Builtin => return a.matmul(b),
        Backend::Unusable(e) => return Err(candle_core::Error::Msg(e.clone())),
    };
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 {
        return a.matmul(b); // candle reports the shape mismatch
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(va)), Storage::Cpu(CpuStorage::F32(vb))) = (&*sa, &*sb)
    else {
        drop((sa, sb));
        return a.matmul(b);
    };
    let (Some(oa), Some(ob)) = (operand(la, va.len()), operand(lb, vb.len())) else {
        drop((sa, sb));
        return a.matmul(b);
    };
    let mut out = vec![0f32; m * n];
    let fits = [m, n, k, oa.ld, ob.ld]
        .iter()
        .all(|&d| c_int::try_from(d).is_ok());
    if !fits {
        drop((sa, sb));
        return a.matmul(b);
    }
    if m > 0 && n > 0 && k > 0 {
        // OpenBLAS runs single-threaded; rayon splits the output's rows, so there is one thread
        // pool (no two pools spinning against each other) and every row is the same full-K
        // product whatever the split: results do not depend on the thread count.
        let rows = m
            .div_ceil(rayon::current_num_threads())
            .max(MIN_ROWS_PER_TASK);
        out.par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, block)| {
                let r0 = i * rows;
                blas.product(&oa.rows_from(r0, va), &ob.rows_from(0, vb), block, n, k);
            });
    }
    drop((sa, sb));
    Tensor::from_vec(out, (m, n), a.device())
}

/// A 2-D operand as cblas wants it: where it starts, whether it is transposed, its leading
/// dimension.
struct Operand {
    start: usize,
    trans: c_int,
    ld: usize,
}

impl Operand {
    /// The operand from its row `r`, as (data from that row's first element, trans, ld).
    fn rows_from<'a>(&self, r: usize, data: &'a [f32]) -> (&'a [f32], c_int, usize) {
        let offset = if self.trans == NO_TRANS {
            r * self.ld
        } else {
            r
        };
        (&data[self.start + offset..], self.trans, self.ld)
    }
}

fn operand(layout: &Layout, len: usize) -> Option<Operand> {
    let (&[rows, cols], &[s0, s1]) = (layout.dims(), layout.stride()) else {
        return None;
    };
    let start = layout.start_offset();
    let (trans, ld, outer, inner) = if s1 == 1 && s0 >= cols {
        (NO_TRANS, s0, rows, cols)
    } else if s0 == 1 && s1 >= rows {
        (TRANS, s1, cols, rows)
    } else {
        return None;
    };
    // The last element read is at start + (outer - 1) * ld + inner - 1.
    let end = start.checked_add(outer.checked_sub(1)?.checked_mul(ld)?)? + inner;
    (end <= len).then_some(Operand { start, trans, ld })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Every operand layout the runtime passes gives candle's own answer.
    #[test]
    fn products_match_candle_for_every_layout() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (67, 40), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (40, 33), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (33, 40), &dev).unwrap();
        let wide = Tensor::randn(0f32, 1.0, (67, 50), &dev).unwrap();
        let cases = [
            (a.clone(), b.clone()),
            (a.clone(), w.t().unwrap()),
            (a.t().unwrap().contiguous().unwrap().t().unwrap(), b.clone()),
            (wide.narrow(1, 5, 40).unwrap(), b.clone()),
        ];
        for (x, y) in cases {
            let want = x.matmul(&y).unwrap();
            let got = matmul(&x, &y).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(close(&got, &want) < 1e-4, "{}", close(&got, &want));
        }
    }

    #[test]
    fn operands_out_of_bounds_are_refused() {
        let l = Layout::new((4, 3).into(), vec![3, 1], 0);
        assert!(operand(&l, 12).is_some());
        assert!(operand(&l, 11).is_none());
        let t = Layout::new((3, 4).into(), vec![1, 3], 0);
        assert_eq!(operand(&t, 12).map(|o| o.trans), Some(TRANS));
    }
}
