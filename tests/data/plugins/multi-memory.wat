;; Test fixture (prefetch world of moehost:policy@0.2.1, core module before `component new`):
;; besides its canonical memory it declares three more linear memories, and every `on-routed`
;; call grows each of them by 1 MiB and writes every byte, until growth fails.
;; Each memory alone stays under a per-memory limit; together they take whatever the host
;; allows. Asks for no prefetches (a valid answer), so only its memory can go wrong.
(module
  (memory (export "memory") 1)
  (memory $a 0)
  (memory $b 0)
  (memory $c 0)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "multi-memory")
  (data (i32.const 48) "test fixture: grows three extra memories")

  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    ;; Bump allocator in the first page's tail and beyond (grown when needed).
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 15)) (i32.const -16)))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (block $fits
      (br_if $fits (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.add (i32.shr_u (global.get $heap) (i32.const 16)) (i32.const 1))))
    )
    (local.get $p))

  (func (export "moehost:policy/prefetch@0.2.1#init")
    (param i32 i32 i32 i64 i32 i32 i32 i32 i32 i32) (result i32)
    (global.set $heap (i32.const 4096))
    (i32.store (i32.const 1024) (i32.const 16))
    (i32.store (i32.const 1028) (i32.const 12))
    (i32.store (i32.const 1032) (i32.const 48))
    (i32.store (i32.const 1036) (i32.const 40))
    (i32.store (i32.const 1040) (i32.const 0))
    (i32.const 1024))

  ;; Grows each extra memory by 16 pages (1 MiB) and fills what it got.
  (func $hog
    (local $old i32)
    (local.set $old (memory.grow $a (i32.const 16)))
    (if (i32.ge_s (local.get $old) (i32.const 0))
      (then (memory.fill $a (i32.mul (local.get $old) (i32.const 65536)) (i32.const 1) (i32.const 1048576))))
    (local.set $old (memory.grow $b (i32.const 16)))
    (if (i32.ge_s (local.get $old) (i32.const 0))
      (then (memory.fill $b (i32.mul (local.get $old) (i32.const 65536)) (i32.const 1) (i32.const 1048576))))
    (local.set $old (memory.grow $c (i32.const 16)))
    (if (i32.ge_s (local.get $old) (i32.const 0))
      (then (memory.fill $c (i32.mul (local.get $old) (i32.const 65536)) (i32.const 1) (i32.const 1048576)))))

  ;; An empty list<prefetch-request> at 1056.
  (func $none (result i32)
    (global.set $heap (i32.const 4096))
    (i32.store (i32.const 1056) (i32.const 0))
    (i32.store (i32.const 1060) (i32.const 0))
    (i32.const 1056))

  (func (export "moehost:policy/prefetch@0.2.1#on-routed")
    (param i64 i32 i32 i32 i32 i32 i32) (result i32)
    (call $hog)
    (call $none))
)
