//! RFC 6962 / RFC 9162 Merkle tree hashing with inclusion and consistency proofs.
//!
//! Leaves are the stored record bytes: `leaf = SHA-256(0x00 || record)`,
//! `node = SHA-256(0x01 || left || right)`, split at the largest power of two below `n`.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

fn split(n: usize) -> usize {
    debug_assert!(n > 1);
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// Merkle tree hash of the given leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            // Iterative: combine level by level (equivalent to the recursive definition,
            // because an odd node is carried up unchanged).
            let mut level: Vec<Hash> = leaves.to_vec();
            let _ = n;
            while level.len() > 1 {
                let mut next = Vec::with_capacity(level.len().div_ceil(2));
                for pair in level.chunks(2) {
                    next.push(match pair {
                        [l, r] => node_hash(l, r),
                        [x] => *x,
                        _ => unreachable!(),
                    });
                }
                level = next;
            }
            level[0]
        }
    }
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first.
/// Appending is O(log n) and the root equals [`root`] over the same leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, hash); heights strictly decrease.
    subtrees: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        self.subtrees.push((0, leaf));
        while let [.., (h1, a), (h2, b)] = self.subtrees[..] {
            if h1 != h2 {
                break;
            }
            self.subtrees.truncate(self.subtrees.len() - 2);
            self.subtrees.push((h1 + 1, node_hash(&a, &b)));
        }
        self.size += 1;
    }

    pub fn root(&self) -> Hash {
        let mut iter = self.subtrees.iter().rev();
        let Some((_, last)) = iter.next() else {
            return empty_root();
        };
        iter.fold(*last, |acc, (_, s)| node_hash(s, &acc))
    }
}

/// Audit path for leaf `index` in the tree of `leaves` (RFC 9162 section 2.1.3.1).
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    assert!(index < n, "leaf {index} outside a tree of {n}");
    if n == 1 {
        return vec![];
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_proof(index, &leaves[..k]);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(index - k, &leaves[k..]);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Verify an inclusion proof (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(
    index: usize,
    size: usize,
    leaf: &Hash,
    proof: &[Hash],
    root_hash: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root_hash
}

/// Consistency proof between the first `m` leaves and all of `leaves` (RFC 9162 2.1.4.1).
pub fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    assert!(m <= n, "old size {m} exceeds new size {n}");
    if m == 0 || m == n {
        return vec![];
    }
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete { vec![] } else { vec![root(leaves)] };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Verify a consistency proof (RFC 9162 section 2.1.4.2).
pub fn verify_consistency(
    m: usize,
    n: usize,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && old_root == new_root;
    }
    if m == 0 {
        return proof.is_empty();
    }
    let mut proof = proof.to_vec();
    if m.is_power_of_two() {
        proof.insert(0, *old_root);
    }
    if proof.is_empty() {
        return false;
    }
    let (mut fnode, mut snode) = (m - 1, n - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (proof[0], proof[0]);
    for c in &proof[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *old_root && sr == *new_root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("leaf {i}").as_bytes()))
            .collect()
    }

    /// The recursive definition from RFC 6962, for cross-checking the iterative root.
    fn root_recursive(l: &[Hash]) -> Hash {
        match l.len() {
            0 => empty_root(),
            1 => l[0],
            n => {
                let k = split(n);
                node_hash(&root_recursive(&l[..k]), &root_recursive(&l[k..]))
            }
        }
    }

    #[test]
    fn frontier_root_equals_the_tree_root() {
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        for n in 1..=70 {
            f.push(leaf_hash(format!("leaf {}", n - 1).as_bytes()));
            assert_eq!(f.root(), root(&leaves(n)), "n={n}");
        }
    }

    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // RFC 6962 test vector: the leaf hash of the empty string.
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn every_inclusion_and_consistency_proof_verifies_up_to_40_leaves() {
        for n in 1..=40 {
            let l = leaves(n);
            let r = root(&l);
            assert_eq!(r, root_recursive(&l), "n={n}");
            for i in 0..n {
                let p = inclusion_proof(i, &l);
                assert!(verify_inclusion(i, n, &l[i], &p, &r), "n={n} i={i}");
                assert!(!verify_inclusion(i, n, &leaf_hash(b"other"), &p, &r));
            }
            for m in 1..=n {
                let p = consistency_proof(m, &l);
                let old = root(&l[..m]);
                assert!(verify_consistency(m, n, &old, &r, &p), "m={m} n={n}");
                if m < n {
                    let mut forged = l.clone();
                    forged[m - 1] = leaf_hash(b"rewritten");
                    assert!(
                        !verify_consistency(m, n, &root(&forged[..m]), &r, &p),
                        "m={m} n={n}"
                    );
                }
            }
        }
    }
}
