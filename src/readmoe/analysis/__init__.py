"""`readmoe analyze`: measure the two properties Read-ME's single pre-gating router relies on.

1. Layer-wise redundancy: how much the expert a token needs at one layer tells about the next
   layer's (mutual information of the dense model's best-overlap experts, and of a layer-wise
   baseline's gates). High -> one routing decision per token loses little.
2. Temporal locality: how often a token reuses the previous token's expert (the pre-gating
   router, the oracle, the layer-wise gates). High -> caching and prefetching experts pay.

Plus the domain x expert confusion and the expert usage of each router.

``analysis.json`` layout (shares in [0, 1], MI in bits):

- ``model``, ``layerwise_model``, ``dense``, ``corpus``, ``router_type``: inputs;
  ``tokens``, ``sequences``, ``block_size``, ``tokens_per_domain``, ``expert_names``,
  ``domains``, ``routed_layers`` (layers with routed experts), ``definitions``;
- ``layer_redundancy.{oracle,layerwise}``: ``pairs`` (per consecutive routed pair:
  ``layers``, ``mi_bits``, ``normalised_mi``, ``entropy_bits`` [l, next],
  ``best_successor_share``, ``same_expert_share``, ``counts`` E x E transitions),
  ``mean_mi_bits``, ``mean_normalised_mi``, ``mean_best_successor_share``,
  ``independence_bias_bits``;
- ``temporal_locality``: ``reference`` (the paper's Read-ME and Mixtral counts),
  ``pregating``, ``oracle`` (summed-score label), ``oracle_per_layer`` and ``layerwise``
  (per layer, averaged; plus ``per_layer_reuse_share``), each with ``reuse_share``,
  ``iid_reuse_share`` and ``reuse_distance`` (bucket -> share of tokens);
- ``domain_expert.{pregating,oracle}``: ``rows`` (domains), ``columns`` (experts),
  ``counts``, ``shares`` (rows sum to 1), ``own_expert_share`` (tokens sent to the expert named
  after their domain, null if no names match); pregating adds ``oracle_agreement``;
- ``expert_usage``: ``pregating``, ``oracle`` ({``shares``, ``entropy_bits``}),
  ``oracle_per_layer`` and ``layerwise_per_layer`` (one such entry per routed layer).

Definitions of the measures: ``readmoe.analysis.information``.
"""
