;; Test fixture (prefetch world of moehost:policy@0.2.1, core module before `component new`):
;; every `on-routed` call grows a function table by 64K elements (tables have no
;; per-table byte limit in wasmtime's StoreLimits) until growth fails. Asks for no prefetches
;; (a valid answer), so only its memory can go wrong.
(module
  (memory (export "memory") 1)
  (table $t 0 funcref)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 16) "table-grow")
  (data (i32.const 48) "test fixture: grows a function table")

  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
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
    (i32.store (i32.const 1028) (i32.const 10))
    (i32.store (i32.const 1032) (i32.const 48))
    (i32.store (i32.const 1036) (i32.const 36))
    (i32.store (i32.const 1040) (i32.const 0))
    (i32.const 1024))

  (func $hog
    (drop (table.grow $t (ref.null func) (i32.const 65536))))

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
