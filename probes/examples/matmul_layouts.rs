//! How fast gemm computes `x Wᵀ` for SmolLM2-135M's layer shapes with the weight stored as
//! HF does (`[out, in]`, by the routes `x Wᵀ` and `(W xᵀ)ᵀ`) and stored `[in, out]`, and
//! whether the three give the same bits. Single-threaded; each figure is a ratio against the
//! stored-as-HF routes measured in the same run.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p probes --example matmul_layouts`

use std::time::Instant;

use candle_core::{Device, Tensor};

fn millis(reps: usize, f: &dyn Fn() -> Tensor) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64 * 1e3
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

fn main() {
    let dev = Device::Cpu;
    // (rows, in, out): fused q/k/v, gate/up, down at decode-step and prompt-pass row counts,
    // and the unembedding.
    let shapes = [
        (4, 576, 960),
        (30, 576, 960),
        (30, 576, 3072),
        (30, 1536, 576),
        (4, 1536, 576),
        (200, 576, 3072),
        (200, 1536, 576),
        (30, 576, 49152),
    ];
    println!("rows    in   out   x Wᵀ ms  (W xᵀ)ᵀ ms  [in,out] ms  speed-up  same bits");
    for (m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let reps = (2_000_000_000 / (m * k * n)).clamp(5, 500);
        let xwt = || x.matmul(&w.t().unwrap()).unwrap();
        let wxt = || {
            let xt = x.t().unwrap().contiguous().unwrap();
            w.matmul(&xt).unwrap().t().unwrap().contiguous().unwrap()
        };
        let stored = || x.matmul(&wt).unwrap();
        let (a, b, c) = (
            millis(reps, &xwt),
            millis(reps, &wxt),
            millis(reps, &stored),
        );
        let same = bits(&xwt()) == bits(&stored()) && bits(&wxt()) == bits(&stored());
        println!(
            "{m:>4} {k:>5} {n:>5} {a:>9.3} {b:>11.3} {c:>12.3} {:>8.2}x  {same}",
            a.min(b) / c
        );
    }
}
