//! Which quantised weights a decode step should read: candle's product of one, two and eight
//! rows with Qwen2.5-Coder-1.5B's MLP shapes, 28 layers' worth of distinct matrices so that
//! the weights stream from memory as in a real decode step, for each stored type against a
//! Q8_0 copy; and mechwatch's own Q4_K and Q6_K kernels (`probes::kquant`) on the same
//! blocks, at one to 32 rows (a chat prompt's prefill), against the f32 product of the
//! dequantized weights stored `[in, out]` that prompt passes use.
//!
//!   cargo run --release -p probes --example decode_kernels

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use probes::kquant::{KMatrix, KQuant};

fn main() -> candle_core::Result<()> {
    let layers = 28;
    for (name, out, d_in) in [("gate_up", 17920, 1536), ("down", 1536, 8960)] {
        let w = Tensor::randn(0f32, 0.02, (out, d_in), &Device::Cpu)?;
        f32_product(name, &w, 32)?;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype)?;
            let bytes = q.storage_size_in_bytes();
            let ms: Vec<QMatMul> = (0..layers)
                .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?))
                .collect::<candle_core::Result<_>>()?;
            for rows in [1usize, 2, 8] {
                let x = Tensor::randn(0f32, 1.0, (rows, 1, d_in), &Device::Cpu)?;
                for m in &ms {
                    m.forward(&x)?; // warm-up (repacks where candle does)
                }
                let reps = 5;
                let t = Instant::now();
                for _ in 0..reps {
                    for m in &ms {
                        std::hint::black_box(m.forward(&x)?);
                    }
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                println!(
                    "{name:8} {out:6}x{d_in:5} x{layers} {dtype:?}  {rows} rows: {:7.2} ms, {:5.1} GB/s of stored blocks",
                    s * 1e3,
                    (bytes * layers) as f64 / s / 1e9
                );
            }
            let kind = KQuant::of(dtype).filter(|_| probes::kquant::supported());
            if let Some(kind) = kind {
                let ours: Vec<KMatrix> = ms
                    .iter()
                    .map(|_| {
                        let q = QTensor::quantize(&w, dtype)?;
                        KMatrix::from_ggml(kind, &q.data()?, out, d_in)
                            .ok_or_else(|| candle_core::Error::Msg("not K-quant blocks".into()))
                    })
                    .collect::<candle_core::Result<_>>()?;
                for rows in [1usize, 2, 8, 32] {
                    let x: Vec<f32> = (0..rows * d_in).map(|i| (i % 13) as f32 - 6.0).collect();
                    let reps = 5;
                    let t = Instant::now();
                    for _ in 0..reps {
                        for m in &ours {
                            std::hint::black_box(m.matmul(&x, rows));
                        }
                    }
                    let s = t.elapsed().as_secs_f64() / reps as f64;
                    println!(
                        "{name:8} {out:6}x{d_in:5} x{layers} {dtype:?} (probes::kquant)  {rows} rows: {:7.2} ms, {:5.1} GB/s of file blocks",
                        s * 1e3,
                        (bytes * layers) as f64 / s / 1e9
                    );
                }
            }
        }
    }
    Ok(())
}

/// The f32 product of `rows` rows with `w` stored `[in, out]`, as a prompt pass computes it
/// (4 distinct matrices: at 32 rows the arithmetic, not the memory, bounds it).
fn f32_product(name: &str, w: &Tensor, rows: usize) -> candle_core::Result<()> {
    let (out, d_in) = w.dims2()?;
    let ws: Vec<Tensor> = (0..4)
        .map(|i| (w + i as f64 * 1e-3)?.t()?.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let x = Tensor::randn(0f32, 1.0, (rows, d_in), &Device::Cpu)?;
    for w in &ws {
        x.matmul(w)?;
    }
    let reps = 7;
    let t = Instant::now();
    for _ in 0..reps {
        for w in &ws {
            std::hint::black_box(x.matmul(w)?);
        }
    }
    let per_matrix = t.elapsed().as_secs_f64() / (reps * ws.len()) as f64;
    println!(
        "{name:8} {out:6}x{d_in:5} x28 f32 [in, out] (prompt passes)  {rows} rows: {:7.2} ms",
        per_matrix * 28.0 * 1e3
    );
    Ok(())
}
