use super::*;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// A `[rows, cols]` tensor of `dtype` quantised by candle from seeded values, with its
/// dequantized values.
fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<f32>) {
    let mut state = seed;
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // A few outlying columns, as real weights have.
            if i % 97 == 0 {
                u * 8.0
            } else {
                u
            }
        })
        .collect();
    let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap();
    let deq = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q, deq)
}

fn matrix(kind: KQuant, q: &QTensor, rows: usize, cols: usize) -> KMatrix {
    KMatrix::from_ggml(kind, q.data().unwrap().as_ref(), rows, cols).unwrap()
}

fn inputs(m: usize, cols: usize) -> Vec<f32> {
    (0..m * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 61 == 0 { 6.0 } else { 1.0 })
        .collect()
}

const KINDS: [(KQuant, GgmlDType); 2] =
    [(KQuant::Q4K, GgmlDType::Q4K), (KQuant::Q6K, GgmlDType::Q6K)];

#[test]
fn the_kernels_sum_what_ggml_sums() {
    if !supported() {
        eprintln!("skipped: this CPU lacks AVX2 and FMA; decode uses the Q8_0 copy");
        return;
    }
    for (kind, dtype) in KINDS {
        let (rows, cols, m) = (96, 512, 3);
        let (q, deq) = quantized(dtype, rows, cols, 7);
        let w = matrix(kind, &q, rows, cols);
        assert_eq!(
            w.dequantize(),
            deq,
            "{kind:?}: the blocks hold candle's values"
        );
        let x = inputs(m, cols);
        let ours = w.matmul(&x, m);

        // candle's product quantises the activations the same way (ggml's Q8_K), so only
        // the order of the float scaling differs.
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        let theirs = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * scale,
                "{kind:?}: output {i}: ours {a}, candle {b}"
            );
        }

        // The scalar sum, and the f32 product of the dequantized weights (the activations'
        // rounding alone apart).
        let acts: Vec<Vec<ActBlock>> = x.chunks_exact(cols).map(quantize_row).collect();
        for i in 0..m {
            for r in 0..rows {
                let (part, range) = w.locate(r).unwrap();
                let reference = part.dot_reference(range, &acts[i]);
                let got = ours[i * rows + r];
                assert!(
                    (got - reference).abs() <= 1e-5 * scale,
                    "{kind:?}: ({i}, {r})"
                );
                let exact: f32 = (0..cols).map(|c| deq[r * cols + c] * x[i * cols + c]).sum();
                assert!(
                    (got - exact).abs() <= 2e-2 * scale,
                    "{kind:?}: ({i}, {r}): {got} vs f32 {exact}"
                );
            }
        }
    }
}

#[test]
fn a_row_is_the_same_bits_alone_and_in_a_batch() {
    if !supported() {
        return;
    }
    let (rows, cols) = (200, 256);
    let (q4, _) = quantized(GgmlDType::Q4K, rows, cols, 11);
    let (q6, _) = quantized(GgmlDType::Q6K, 70, cols, 12);
    let w = KMatrix::stack(&[
        &matrix(KQuant::Q4K, &q4, rows, cols),
        &matrix(KQuant::Q6K, &q6, 70, cols),
    ])
    .unwrap();
    let rows = w.rows();
    // More rows than a chunk (32), not a multiple of a load (4).
    let m = 37;
    let x = inputs(m, cols);
    let batch = w.matmul(&x, m);
    for i in 0..m {
        let alone = w.matmul(&x[i * cols..(i + 1) * cols], 1);
        assert_eq!(alone, batch[i * rows..(i + 1) * rows].to_vec(), "row {i}");
    }
}

#[test]
fn rows_gather_and_stack_across_kinds() {
    let cols = 512;
    let (q4, d4) = quantized(GgmlDType::Q4K, 4, cols, 3);
    let (q6, d6) = quantized(GgmlDType::Q6K, 3, cols, 5);
    let (w4, w6) = (
        matrix(KQuant::Q4K, &q4, 4, cols),
        matrix(KQuant::Q6K, &q6, 3, cols),
    );
    let s = KMatrix::stack(&[&w4, &w6, &w4]).unwrap();
    assert_eq!(s.rows(), 11);
    assert_eq!(s.kinds(), [KQuant::Q4K, KQuant::Q6K, KQuant::Q4K]);
    let row = |d: &[f32], r: usize| d[r * cols..(r + 1) * cols].to_vec();
    let deq = s.dequantize();
    assert_eq!(row(&deq, 5), row(&d6, 1));
    assert_eq!(row(&deq, 10), row(&d4, 3));

    // A gather that keeps two runs of Q4_K rows apart and joins neighbours of one kind.
    let g = s.gather_rows(&[10, 0, 4, 6, 1]).unwrap();
    assert_eq!(g.kinds(), [KQuant::Q4K, KQuant::Q6K, KQuant::Q4K]);
    let deq = g.dequantize();
    for (i, want) in [
        row(&d4, 3),
        row(&d4, 0),
        row(&d6, 0),
        row(&d6, 2),
        row(&d4, 1),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(row(&deq, i), want, "gathered row {i}");
    }
    assert!(s.gather_rows(&[11]).is_none());
    assert!(KMatrix::stack(&[
        &w4,
        &matrix(KQuant::Q4K, &quantized(GgmlDType::Q4K, 1, 256, 1).0, 1, 256)
    ])
    .is_none());
    assert!(KMatrix::from_ggml(KQuant::Q4K, &[0u8; 143], 1, 256).is_none());
    assert!(KMatrix::from_ggml(KQuant::Q4K, &[0u8; 144], 1, 128).is_none());
    assert!(KMatrix::from_ggml(KQuant::Q6K, &[0u8; 209], 1, 256).is_none());
    // A Q6_K block whose scale is infinite (f16 0x7c00).
    let mut inf = [0u8; 210];
    inf[209] = 0x7c;
    assert!(KMatrix::from_ggml(KQuant::Q6K, &inf, 1, 256).is_none());
}

/// Every kernel this CPU runs gives the AVX2 kernel's bits, in tiles of any shape: a row's
/// result never depends on which kernel, or which neighbours, computed it.
#[test]
fn every_kernel_gives_the_avx2_kernels_bits() {
    if !Kernel::Avx2.runs_here() {
        return;
    }
    let cols = 768;
    for (kind, dtype) in KINDS {
        let (q, _) = quantized(dtype, 7, cols, 21);
        let w = matrix(kind, &q, 7, cols);
        let x = inputs(9, cols);
        let acts: Vec<Vec<ActBlock>> = x.chunks_exact(cols).map(quantize_row).collect();
        let part = &w.parts[0];
        let k = cols / QK_K;
        let avx2: Vec<Vec<f32>> = (0..7)
            .map(|r| {
                acts.iter()
                    .map(|a| part.dot_rows_by(Kernel::Avx2, r * k..(r + 1) * k, [a.as_slice()])[0])
                    .collect()
            })
            .collect();
        // The product as `matmul` tiles it (3 weight rows x 4 activation rows, remainders).
        let all = w.matmul(&x, 9);
        for (r, want) in avx2.iter().enumerate() {
            for (i, v) in want.iter().enumerate() {
                assert_eq!(all[i * 7 + r].to_bits(), v.to_bits(), "{kind:?} ({i}, {r})");
            }
        }
        for kernel in [Kernel::Avx2, Kernel::Avx512] {
            if !kernel.runs_here() {
                eprintln!("{kernel:?} not on this CPU: compared only as `matmul` runs");
                continue;
            }
            for (r, avx2) in avx2.iter().enumerate() {
                let range = r * k..(r + 1) * k;
                let rows = [0, 3, 5, 8].map(|i| acts[i].as_slice());
                let four = part.dot_rows_by(kernel, range, rows);
                let want = [avx2[0], avx2[3], avx2[5], avx2[8]];
                assert_eq!(
                    four.map(f32::to_bits),
                    want.map(f32::to_bits),
                    "{kernel:?} {kind:?} row {r}"
                );
            }
        }
    }
}
