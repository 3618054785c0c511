"""How many programs one Hopper SM holds at once, by registers and by shared memory, and the register cap that adds one
(``mixerzoo.kernels._sm90``; benchmarks/sass_report.py prints both per tile rule). Arithmetic only, no compile."""

from mixerzoo.kernels._sm90 import cap_adding_a_program, programs_per_sm, register_cap

KIB = 1024


def test_programs_per_sm_counts_registers_and_shared_memory():
    # the D = 64 eviction forward (NOTES-eviction, stops 53 and 54): 216 registers, 56 KiB, 4 warps
    assert programs_per_sm(216, 56 * KIB, 4) == (2, 4)
    assert programs_per_sm(168, 56 * KIB, 4) == (3, 4)
    # registers are allocated 8 per thread at a time: 161 counts as 168, 169 as 176
    assert programs_per_sm(161, 0, 4)[0] == 3 and programs_per_sm(169, 0, 4)[0] == 2
    assert programs_per_sm(228, 128 * KIB, 8) == (1, 1)
    # 64 resident warps at most, however few registers
    assert programs_per_sm(24, 0, 4)[0] == 16 and programs_per_sm(32, 0, 8)[0] == 8
    # each block takes 1 KiB of shared memory besides its own, out of 228 KiB
    assert programs_per_sm(32, 113 * KIB, 4)[1] == 2 and programs_per_sm(32, 114 * KIB, 4)[1] == 1
    assert programs_per_sm(32, 227 * KIB, 4)[1] == 1


def test_register_cap_is_the_largest_that_fits():
    assert register_cap(4, 3) == 168 and register_cap(4, 4) == 128 and register_cap(8, 2) == 128
    assert register_cap(4, 1) == 255  # a thread holds at most 255
    assert register_cap(8, 9) == 0  # 28 registers per thread would be left: no cap can
    for warps in (1, 2, 4, 8, 16):
        for programs in range(1, 17):
            cap = register_cap(warps, programs)
            if cap:
                assert programs_per_sm(cap, 0, warps)[0] >= programs, (warps, programs, cap)
                assert cap == 255 or programs_per_sm(cap + 1, 0, warps)[0] < programs, (warps, programs, cap)


def test_cap_adding_a_program_only_where_registers_bind():
    assert cap_adding_a_program(216, 56 * KIB, 4) == 168  # two programs by registers, four by shared memory
    assert cap_adding_a_program(144, 56 * KIB, 4) == 128
    assert cap_adding_a_program(233, 112 * KIB, 4) == 0  # two either way: shared memory binds
    assert cap_adding_a_program(168, 64 * KIB, 4) == 0  # three either way
