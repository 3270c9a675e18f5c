"""parallel.collectives reads what a compiled step sends from its HLO text."""

from jaxsft import parallel


def test_a_collective_of_more_than_five_results_counts_every_result():
    """TPU's compiler merges a step's gradient all-reduces into one op whose tuple of results carries
    /*index=5*/ comments; their '=' used to end the shapes there (5 of 6 results counted)."""
    text = ("%x = (f32[4]{0}, f32[4]{0}, f32[4]{0}, f32[4]{0}, f32[4]{0}, /*index=5*/bf16[8,2]{1,0}) "
            "all-reduce(%a, %b), replica_groups={{0,1}}\n"
            "%y = f32[16,4]{1,0} all-gather(%c), dimensions={0}\n")
    assert parallel.collectives(text) == {"all-reduce": {"ops": 1, "bytes": 5 * 16 + 32},
                                          "all-gather": {"ops": 1, "bytes": 256}}
