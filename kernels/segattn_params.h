/* The one definition of the parameters passed from Rust to every segattn kernel.
 *
 * build.rs feeds this header to bindgen, so the Rust and CUDA sides can never disagree on the
 * layout. Plain C: no C++ features, no CUDA types. All strides are in ELEMENTS, not bytes.
 *
 * Mask semantics (same as src/mask): query row i sits at position i + (kv_len - q_len), key j at j.
 * Key j is visible to query i according to rule(seg_q[i], seg_kv[j]):
 *   - if pair_table != NULL and both ids < table_size and the entry != SEGATTN_RULE_DEFAULT: the entry;
 *   - else intra_rule when the ids are equal, inter_rule when they differ.
 * A rule is SEGATTN_RULE_BLOCKED (never), SEGATTN_RULE_CAUSAL (j <= pos(i)) or SEGATTN_RULE_FULL.
 */
#ifndef SEGATTN_PARAMS_H
#define SEGATTN_PARAMS_H

#include <stdint.h>

#define SEGATTN_RULE_BLOCKED 0
#define SEGATTN_RULE_CAUSAL 1
#define SEGATTN_RULE_FULL 2
/* Only in pair tables: "no override, use intra_rule / inter_rule". */
#define SEGATTN_RULE_DEFAULT 3

/* Tile classes (see src/mask/tiles.rs and kernels/mask.cuh: one definition). */
#define SEGATTN_TILE_SKIP 0
#define SEGATTN_TILE_PARTIAL 1
#define SEGATTN_TILE_FULL 2

#define SEGATTN_DTYPE_F16 0
#define SEGATTN_DTYPE_BF16 1
#define SEGATTN_DTYPE_F32 2

/* Most key slices (kv_splits) of a PINE decode-importance launch: its merge keeps a weight per
 * slice and query head in shared memory. */
#define SEGATTN_DECODE_SCORES_MAX_SPLITS 128

/* The fused backward kernel's block: threads, and keys of one KV head (its grid's x covers the
 * keys in blocks of this many; kernels/bwd_traits.cuh asserts both). */
#define SEGATTN_BWD_THREADS 128
#define SEGATTN_BWD_BLOCK_KEYS 64

/* Segment metadata of one side (queries or keys), O(len) per batch row. */
typedef struct SegattnSegments {
  /* [batch, len] segment id of every position (non-decreasing along a row). */
  const uint32_t *ids;
  /* [batch, len] one past the last position of the segment that position belongs to. */
  const uint32_t *span_end;
  /* elements between consecutive batch rows of ids and span_end (the row itself is contiguous). */
  int64_t batch_stride;
} SegattnSegments;

/* Strides of a [batch, len, heads, head_dim] tensor whose last dimension is contiguous. */
typedef struct SegattnStrides {
  int64_t batch;
  int64_t row;
  int64_t head;
} SegattnStrides;

/* PINE's query rotation (the segattn_fwd_rope_* entry points; kernels/rotary.cuh). Keys are
 * rotated once at their original positions; query row i of query group g is rotated, for the keys
 * of segment id s, by position q_pos[i] + shifts[g][s] (rotate-half pairs (c, c + head_dim / 2)),
 * which gives PINE's rope(q, p_q) . rope(k, p_k - shift). */
typedef struct SegattnRotation {
  /* [table_len, head_dim / 2] f32: cos / sin of position p for pair c; table_len > every
   * q_pos + shift. 8-byte aligned on the GPU (read two pairs at a time). */
  const float *cos;
  const float *sin;
  int32_t table_len;
  int32_t groups;
  /* [B, Lq] original position and query group of every query row. */
  const uint32_t *q_pos;
  const uint32_t *row_group;
  /* [B, H, groups, num_segments] shift of key segment id s for a group; every kv id < num_segments. */
  const uint32_t *shifts;
  int32_t num_segments;
  /* GQA decode packing (see SegattnFwdParams): P > 1 query heads per KV head in the kernel's rows:
   * kernel row i of kernel head h is query row i / P of head h * P + i % P, whose q_pos, row_group
   * and shifts are read. 0 or 1: none. */
  int32_t packed_heads;
} SegattnRotation;

/* Where a per-segment attention mass goes (the mass kernel's output, or the forward kernel's fused
 * one): mass[b, ho, ro, s] (+)= sum over keys j with kv id s of P[b, h, i, j], f32, last dim
 * contiguous, s < num_segments (every kv id must be below it); ho = 0 with head_reduce, else h;
 * ro = the query segment id of row i with query_reduce (every q id below the row count of `mass`),
 * else i. With either reduction the kernel ADDS (atomically) into a zeroed `mass`; otherwise it
 * writes every element. Length / mean weights are applied by the caller afterwards. */
typedef struct SegattnMassOutput {
  float *mass;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t row_stride;
  int32_t num_segments;
  int32_t head_reduce;
  int32_t query_reduce;
} SegattnMassOutput;

typedef struct SegattnFwdParams {
  /* Inputs, dtype given by `dtype`: q [B, Lq, H, D], k and v [B, Lk, Hkv, D]. */
  const void *q;
  const void *k;
  const void *v;
  SegattnStrides q_strides;
  SegattnStrides k_strides;
  SegattnStrides v_strides;

  /* Output [B, Lq, H, D] in the input dtype, contiguous. */
  void *o;
  SegattnStrides o_strides;
  /* Optional [B, H, Lq] f32 natural-log softmax denominator; NULL when not wanted. */
  float *lse;

  SegattnSegments q_segments;
  SegattnSegments kv_segments;

  /* Optional pair table of rules: [table_size, table_size] u8, or one per batch row with
   * table_batch_stride = table_size * table_size (0 when shared). NULL when absent. */
  const uint8_t *pair_table;
  int64_t table_batch_stride;
  int32_t table_size;
  int32_t intra_rule;
  int32_t inter_rule;

  int32_t batch;
  int32_t q_len;
  int32_t kv_len;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t dtype;

  /* Softmax scale applied to q.k, and the same times log2(e) for exp2-based kernels. */
  float scale;
  float scale_log2;

  /* Only for the segattn_fwd_rope_* entry points (all NULL / 0 otherwise). */
  SegattnRotation rotation;

  /* GQA decode packing is done by the launcher alone, through these fields: a one-row query
   * [B, 1, H, D] with H = P Hkv is passed as q_len = P rows of num_heads = Hkv heads (q and o
   * strides row = the head stride, head = P x it), so that the P query heads sharing a KV head run
   * in one block and read K and V once; the mask is rewritten for the P rows (all at the last
   * position, where a causal rule shows every key: causal -> full). Only rotation.packed_heads
   * tells the kernel. */

  /* Split-K (decode: few query rows, long caches). kv_splits <= 1: off, the kernel writes o and
   * lse. kv_splits = S > 1: the grid's x is (query tiles x S); block (t, s) covers key tiles
   * [s * per, (s + 1) * per), per = ceil(tiles / S), and writes its normalised partial output
   * o_accum [S, B, H, Lq, head_dim] f32 and lse_accum [S, B, H, Lq] f32 (-inf: saw nothing);
   * the last of the S blocks of a query tile to finish (counted in split_done [B, H, query tiles]
   * u32, zero at the launch; the last block puts its counter back to zero) merges the partials
   * into o (and lse) through their LSE. */
  int32_t kv_splits;
  float *o_accum;
  float *lse_accum;
  uint32_t *split_done;

  /* Query rows per block of the launched forward entry point: 64, or 128 for segattn_fwd_wide_*
   * (0 reads as 64). The grid's x counts blocks of this many rows; a kernel launched with another
   * value traps (a grid built for another entry point). */
  int32_t block_rows;

  /* Keys per key tile of the launched forward entry point, as a check: 0 (any), or the entry's
   * (64; 32 for segattn_fwd_wide_* at head dim 128, 64 for segattn_fwd_wide64_*): a kernel
   * launched with another value traps. The emulator picks the entry point by it. */
  int32_t block_keys;

  /* Only for the segattn_fwd_mass_* entry points (mass.mass NULL otherwise): the per-segment mass
   * of this attention's softmax, computed in the same pass (one pass: mass.num_segments <= 64;
   * kv_splits must be <= 1). See SegattnMassOutput. */
  SegattnMassOutput mass;
} SegattnFwdParams;

/* Per-segment attention mass (kernels/scores/scores.cu): the softmax of q.k over the visible keys
 * of `base` (q, k, masks, sizes, scale; v, o, lse and base.mass unused), summed per key segment id
 * into `out` (see SegattnMassOutput). With two_pass the kernel adds into a zeroed `out.mass`. */
typedef struct SegattnScoresParams {
  SegattnFwdParams base;
  SegattnMassOutput out;
  /* 0: one pass, accumulators for segment ids 0..63 on chip (num_segments <= 64);
   * 1: two passes (row LSE, then exact probabilities summed per tile), any num_segments. */
  int32_t two_pass;
  /* Optional, with two_pass: [B, H, Lq] f32 natural-log LSE of every row under the same mask
   * (the forward kernel's, -inf for a row that sees nothing); the kernel then skips its first
   * pass (the fused mass of an attention whose segments do not fit on chip). NULL otherwise. */
  const float *saved_lse;
} SegattnScoresParams;

/* Gradients of attention (kernels/bwd/bwd.cu): FlashAttention-2's backward over the key tiles of
 * `base`'s mask. `base` gives q, k, v (16-byte aligned, strides multiples of 8 elements), their
 * strides, the mask, the sizes and the scale (o, lse and the rest unused). With P the softmax of
 * row i (P_ij = exp(scale q_i.k_j - lse_i) on visible keys, 0 elsewhere), dP_ij = dO_i . v_j and
 * dS_ij = P_ij (dP_ij - delta_i):
 *   dq_accum[b, i, h, :] += scale sum_j dS_ij k_j        (f32, atomically: zero it first)
 *   dk[b, j, kh, :] = scale sum over the query heads h of kh and rows i of dS_ij q_i
 *   dv[b, j, kh, :] = sum over the same of P_ij dO_i     (both in the input dtype, every
 *                                                         element written)
 * Grid (ceil(kv_len / 64), num_kv_heads, batch): one block per 64 keys of one KV head. */
typedef struct SegattnBwdParams {
  SegattnFwdParams base;
  /* [B, Lq, H, D] gradient of the output, the input dtype, 16-byte aligned like q. */
  const void *d_out;
  SegattnStrides d_out_strides;
  /* [B, H, Lq] f32: the forward's natural-log LSE, and delta_i = dO_i . O_i (minus the LSE's
   * gradient, if any). A row that sees no key may hold anything (its P is 0). */
  const float *lse;
  const float *delta;
  /* [B, Lq, H, D] f32, contiguous, zeroed before the launch. */
  float *dq_accum;
  /* [B, Lk, Hkv, D] in the input dtype, contiguous. */
  void *dk;
  void *dv;
} SegattnBwdParams;

/* PINE's segment order and shifts on the device (kernels/pine/shifts.cu), from the importance
 * scores. Query groups per (b, h): 0 = prefix rows (no shift), 1..n_b the segments, then one per
 * suffix / generated query row (row first_suffix_row[b] + g - n_b - 1 of the query). For group g
 * and key segment id j in 1..n_b: shift = total length of the segments ranked before j, the order
 * being the group's own segment first, then descending score, ties to the lower id (a stable
 * descending sort, computed by counting: no sort). Every other entry is 0. */
typedef struct SegattnShiftsParams {
  /* [B, H, num_segments, num_segments] f32: I[b, h, i, j], segment query i's importance of
   * segment j (used for rows with n_b > 2; NULL when no row has). */
  const float *segment_scores;
  /* [B, H, scored_rows, num_segments] f32: the per-row scores of the last scored_rows query rows. */
  const float *row_scores;
  /* [B] segment count n_b; [B] first suffix / generated row among the q_len query rows;
   * [B, num_segments] length of the segment with id j (0 for ids that are not segments). */
  const uint32_t *num_segs;
  const uint32_t *first_suffix_row;
  const uint32_t *segment_lens;
  /* [B, H, groups, num_segments] output, every element written. */
  uint32_t *shifts;
  int32_t batch;
  int32_t num_heads;
  int32_t groups;
  int32_t num_segments;
  int32_t q_len;
  int32_t scored_rows;
} SegattnShiftsParams;

/* PINE's importance of decode rows straight from the rotated KV cache (kernels/pine/decode_scores.cu):
 * for query row i of head h, over every key j with key_seg[j] != 0,
 *   s_j = scale * q_i . rope^-1(k_j, key_pos[j])      (k stored rotated at its original position),
 * softmax over those keys, probabilities summed per segment id and divided by seg_lens:
 *   out[b, h, i, s] (s >= 1); every element of out is written (0 for ids without keys). */
typedef struct SegattnDecodeScoresParams {
  /* q [B, Lq, H, D] un-rotated, k [B, Lk, Hkv, D] rotated, dtype given by `dtype` (bf16 / f16);
   * k is read in 16-byte pieces: a 16-byte aligned start and strides that are multiples of 8. */
  const void *q;
  SegattnStrides q_strides;
  const void *k;
  SegattnStrides k_strides;
  /* [B, Lk]: original RoPE position and segment id (0: not scored) of every key. */
  const uint32_t *key_pos;
  const uint32_t *key_seg;
  /* [B, num_segments]: length of every segment id (0 for ids that are not segments). */
  const uint32_t *seg_lens;
  /* [table_len, head_dim / 2] f32 cos / sin; table_len > every key_pos; 16-byte aligned. */
  const float *cos;
  const float *sin;
  /* [B, H, Lq, num_segments] f32 output. */
  float *out;
  /* Key slices (the grid's x): block (x, .) scores keys [x per, (x + 1) per), per =
   * ceil(kv_len / kv_splits), for every query head of its KV head. kv_splits <= 1: the kernel
   * writes `out` itself. kv_splits > 1: it writes each slice's row max `part_max` and exp sum
   * `part_total` [kv_splits, B, H, Lq] and per-segment exp sums `part_acc` [kv_splits, B, H, Lq,
   * num_segments] (every element; max -inf for a slice without segment keys); the last block of
   * a (row, KV head) to finish (counted in `done` [B, Lq, Hkv] u32, zero at the launch and left
   * zero) merges them into `out`. At most SEGATTN_DECODE_SCORES_MAX_SPLITS. */
  int32_t kv_splits;
  float *part_max;
  float *part_total;
  float *part_acc;
  uint32_t *done;
  /* PINE's order of the rows, from their merged scores (kernels/pine/order.cuh): `shifts` [B, H,
   * groups, num_segments] u32, every element written (row i's group n_b + 1 + i -
   * first_suffix_row[b] by the block that merged row i, every other group by row 0's);
   * `num_segs` [B] and `first_suffix_row` [B] as in SegattnShiftsParams, lengths = seg_lens. */
  uint32_t *shifts;
  const uint32_t *num_segs;
  const uint32_t *first_suffix_row;
  int32_t groups;
  int32_t batch;
  int32_t q_len;
  int32_t kv_len;
  int32_t num_heads;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t num_segments;
  int32_t dtype;
  float scale;
} SegattnDecodeScoresParams;

/* Rows rotated at per-token positions (kernels/pine/rope_rows.cu): PINE's keys rotated once at
 * their original positions (and a decode step's new keys, or the queries of the baselines), one
 * pass in the input dtype: out[b, t, h, :] = rope(x[b, t, h, :], sign * pos[b, t]) (rotate-half
 * pairs (c, c + head_dim / 2), computed in f32, rounded once). */
typedef struct SegattnRopeRowsParams {
  /* x [B, L, heads, D] (any strides; the last dimension contiguous), dtype given by `dtype`. */
  const void *x;
  SegattnStrides x_strides;
  /* [B, L, heads, D] contiguous, the dtype of x. */
  void *out;
  /* [pos_batches, L]: each token's position; pos_batches 1 (shared) or B. */
  const uint32_t *pos;
  int32_t pos_batches;
  /* [table_len, head_dim / 2] f32 cos / sin; every position < table_len (checked: trap). */
  const float *cos;
  const float *sin;
  int32_t table_len;
  int32_t batch;
  int32_t len;
  int32_t heads;
  int32_t head_dim;
  /* +1: rotate; -1: undo a rotation. */
  float sign;
  int32_t dtype;
} SegattnRopeRowsParams;

#endif /* SEGATTN_PARAMS_H */
